"""ONNX export of the two encoders, and `OnnxEncoder`: the two graphs on onnxruntime behind the
inference methods `ECLIP` has (`eclip.model.inference.Inference`: product_embedding,
image_text_scores, ground, ...), the same code on either backend.

An export folder holds:
    image_encoder.onnx   images (B, 3, S, S) float, normalised -> global_embedding (B, D),
                         product_embedding (B, D), and with a decoder instances (B, M, D),
                         productness (B, M), attention (B, M, h, w); without a decoder, or
                         with grounding_map="similarity", token_embeddings (B, N, D) to ground
                         with; with "contribution", token_projections (B, N, D), not normalised
    text_encoder.onnx    ids (B, T) int64, mask (B, T) bool -> embedding (B, D)
    tokenizer.json       a Hugging Face text tower's tokenizer, in the `tokenizers` library's
                         format (`tokenizers.Tokenizer.from_file` loads it), padded and truncated
                         to the model's context length; or, for the built-in text tower,
    hash_tokenizer.json  the HashTokenizer's settings (format "eclip-hash-tokenizer/1"): text is
                         tokenised in plain Python (crc32). Exports written before this file had
                         its name hold the same settings in tokenizer.json, and still load.
    config.json          the model's config (embedding size, selection rule), as in a model folder
    manifest.json        shapes, selection rule, logit scale, the tokenizer's file and kind, and
                         the parity check's max differences

The export is written to a temporary folder and checked there: each graph output, the
image-text scores and the grounding maps of `OnnxEncoder` against PyTorch, and the saved
tokenizer's ids against the model's. Above the tolerance `export_onnx` raises `ParityError` and
leaves `out` as it was.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eclip.atomic import atomic_folder
from eclip.config import ModelConfig, from_dict, to_dict
from eclip.io import CONFIG_NAME
from eclip.model.eclip import ECLIP
from eclip.model.inference import ImageEncoding, Inference
from eclip.model.tokenizer import CLS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, HashTokenizer

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"  # the `tokenizers` library's format (Hugging Face towers)
HASH_TOKENIZER_FILE = "hash_tokenizer.json"  # eclip's own schema (the built-in text tower)
HASH_TOKENIZER_FORMAT = "eclip-hash-tokenizer/1"
MANIFEST_FILE = "manifest.json"
FORMAT = "eclip-onnx/2"  # /1: the hash tokenizer's settings in tokenizer.json, no "tokenizer" entry
OPSET = 18
DEFAULT_TOLERANCE = 1e-4


class ImageEncoderGraph(nn.Module):
    """What the exported image graph computes: every output of `encode_image` the service
    needs, plus the text-free product embedding (so that indexing needs one call)."""

    def __init__(self, model: ECLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoding = self.model.encode_image(images)
        product = self.model.product_embedding_from(encoding)
        if encoding.instances is None:
            return encoding.global_embedding, product, nn.functional.normalize(self.model.image_head(encoding.tokens), dim=-1)
        decoder = (encoding.global_embedding, product, encoding.instances, encoding.productness, encoding.attention)
        extra = GROUNDING_OUTPUT[self.model.config.grounding_map]
        if extra is None:
            return decoder
        projected = self.model.image_head(encoding.tokens)  # (B, N, D)
        return (*decoder, nn.functional.normalize(projected, dim=-1) if extra == "token_embeddings" else projected)


class TextEncoderGraph(nn.Module):
    def __init__(self, model: ECLIP):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text((ids, mask))


# what a decoder model's graph adds for its grounding map: projected tokens, normalised for
# "similarity", not for "contribution" (their dot products with the text weight the attention)
GROUNDING_OUTPUT = {"attention": None, "similarity": "token_embeddings", "contribution": "token_projections"}


def image_output_names(config: ModelConfig) -> list[str]:
    if config.has_decoder:
        decoder = ["global_embedding", "product_embedding", "instances", "productness", "attention"]
        extra = GROUNDING_OUTPUT[config.grounding_map]
        return decoder if extra is None else [*decoder, extra]
    return ["global_embedding", "product_embedding", "token_embeddings"]


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str]) -> None:
    """torch.onnx.export with a dynamic batch axis on every input and output."""
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with warnings.catch_warnings():
        # the exporter is chatty about tracing details that do not change the graph
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: no extra dependencies, stable graphs for these ops
        )


@dataclass
class ExportReport:
    folder: Path
    # per output, ONNX against PyTorch on random inputs: "image.<output>", "text.embedding",
    # "scores.image_text" (image_text_scores) and "grounding.map" (heatmaps_from, the grid maps)
    max_abs_diff: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(diff <= self.tolerance for diff in self.max_abs_diff.values())

    def failures(self) -> dict[str, float]:
        return {name: diff for name, diff in self.max_abs_diff.items() if not diff <= self.tolerance}


class ParityError(ValueError):
    """The exported graphs differ from PyTorch by more than the tolerance (nothing was written)."""

    def __init__(self, report: ExportReport):
        self.report = report
        worst = ", ".join(f"{name} {diff:.2e}" for name, diff in report.failures().items())
        super().__init__(f"ONNX differs from PyTorch by more than {report.tolerance:g}: {worst}; {report.folder} not written")


def _max_diff(diffs: dict[str, float], name: str, expected: torch.Tensor | np.ndarray, got: torch.Tensor | np.ndarray) -> None:
    e = expected.numpy() if isinstance(expected, torch.Tensor) else expected
    g = got.numpy() if isinstance(got, torch.Tensor) else got
    # NaN on either side must fail the check: nan > tolerance is False, so store it as inf
    diff = float(np.abs(e.astype(np.float64) - g.astype(np.float64)).max()) if e.size else 0.0
    diffs[name] = max(diffs.get(name, 0.0), diff if np.isfinite(diff) else float("inf"))


def _parity_texts(generator: torch.Generator, batch: int, context_length: int) -> list[str]:
    """Random words of random lengths (up to beyond the context, so truncation is exercised),
    one empty text, and some catalog-like words a WordPiece vocabulary splits."""
    words = ["red", "striped", "shirt", "slim-fit", "Jeans", "handbag", "ünïcode", "42cm", "x"]
    texts = []
    for n in torch.randint(0, context_length + 4, (batch,), generator=generator).tolist():
        picks = torch.randint(0, 10_000, (n,), generator=generator).tolist()
        texts.append(" ".join(words[p % len(words)] if p % 3 else f"w{p}" for p in picks))
    if batch > 1:
        texts[-1] = ""
    return texts


def export_onnx(model: ECLIP, out: str | Path, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> ExportReport:
    """Export both encoders and the tokenizer into `out`, atomically, after checking them
    against PyTorch on random inputs of two batch sizes (so the dynamic axis is exercised too):
    every graph output, the image-text scores and grounding maps `OnnxEncoder` computes from
    them, and the saved tokenizer's ids. Raises `ParityError` above `tolerance`, `ValueError` for
    a tokenizer that cannot be saved."""
    model = model.eval().cpu()
    out = Path(out)
    has_decoder = model.decoder is not None
    size = model.image_size
    tokenizer = model.tokenizer
    context_length = tokenizer.context_length
    generator = torch.Generator().manual_seed(seed)

    image_graph, text_graph = ImageEncoderGraph(model).eval(), TextEncoderGraph(model).eval()
    outputs = image_output_names(model.config)
    config = model.config
    diffs: dict[str, float] = {}
    report = ExportReport(out, diffs, tolerance)
    with atomic_folder(out) as tmp:
        tokenizer_entry = save_tokenizer(tokenizer, tmp)  # first: an unsupported tokenizer fails fast
        sample_images = torch.randn(2, 3, size, size, generator=generator)
        sample_ids, sample_mask = tokenizer(["a red striped shirt", "blue jeans"])
        _export(image_graph, (sample_images,), tmp / IMAGE_FILE, ["images"], outputs)
        _export(text_graph, (sample_ids, sample_mask), tmp / TEXT_FILE, ["ids", "mask"], ["embedding"])
        (tmp / CONFIG_NAME).write_text(json.dumps(to_dict(config), indent=2), encoding="utf-8")
        manifest = {
            "format": FORMAT,
            "image_size": size,
            "embed_dim": config.embed_dim,
            "context_length": context_length,
            "tokenizer": tokenizer_entry,
            "has_decoder": has_decoder,
            "selection": config.selection,
            "selection_temperature": config.selection_temperature,
            "logit_scale": float(model.logit_scales["global"]().item()),
            "image_outputs": outputs,
            "normalisation": {"mean": 0.5, "std": 0.5, "resize": "bicubic, squashed to a square"},
            "opset": OPSET,
            "tolerance": tolerance,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")

        encoder = OnnxEncoder(tmp, threads=1)
        for batch in (1, 5):
            images = torch.randn(batch, 3, size, size, generator=generator)
            with torch.no_grad():
                expected = image_graph(images)
            got = encoder.image_session.run(outputs, {"images": images.numpy()})
            for name, e, g in zip(outputs, expected, got):
                _max_diff(diffs, f"image.{name}", e, g)
            texts = _parity_texts(generator, batch, context_length)
            ids, mask = tokenizer(texts)
            np_ids, np_mask = encoder.tokenizer(texts)
            if not (np.array_equal(np_ids, ids.numpy()) and np.array_equal(np_mask, mask.numpy())):
                bad = next(t for t in texts if not np.array_equal(encoder.tokenizer([t])[0], tokenizer([t])[0].numpy()))
                raise ValueError(f"the saved tokenizer ({tokenizer_entry['file']}) tokenises {bad!r} unlike the model's")
            with torch.no_grad():
                text_ref = text_graph(ids, mask)
                text_got = encoder.encode_text(texts)
                _max_diff(diffs, "text.embedding", text_ref, text_got)
                ref, enc = model.encode_image(images), encoder.encode_image(images)
                _max_diff(diffs, "scores.image_text", model.image_text_scores(ref, text_ref), encoder.image_text_scores(enc, text_got))
                _max_diff(diffs, "grounding.map", model.heatmaps_from(ref, text_ref)[0], encoder.heatmaps_from(enc, text_got)[0])
        del encoder  # onnxruntime holds the files open on some platforms
        manifest["max_abs_diff"] = diffs
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if not report.ok:
            raise ParityError(report)
    return report


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_config(tokenizer: HashTokenizer) -> dict:
    """Everything needed to reproduce `HashTokenizer` without this package: lower-case, take
    the words matching `word_pattern`, keep the first context_length - 2, map each word to
    num_special + crc32(utf-8) % (vocab_size - num_special), wrap in CLS ... EOS, pad with PAD."""
    return {
        "format": HASH_TOKENIZER_FORMAT,
        "kind": "hash",
        "vocab_size": tokenizer.vocab_size,
        "context_length": tokenizer.context_length,
        "word_pattern": "[a-z0-9]+",
        "lowercase": True,
        "hash": "crc32",
        "num_special": NUM_SPECIAL,
        "pad_id": PAD_ID,
        "cls_id": CLS_ID,
        "eos_id": EOS_ID,
    }


def save_tokenizer(tokenizer, folder: Path) -> dict:
    """Write the model's tokenizer into `folder`; returns the manifest's entry (kind, file,
    context length). A HashTokenizer -> hash_tokenizer.json; a Hugging Face fast tokenizer ->
    tokenizer.json in the `tokenizers` format, padded and truncated to the context length as the
    model's tokenizer call is."""
    from eclip.model.towers.hf import HFTokenizer

    if isinstance(tokenizer, HashTokenizer):
        (folder / HASH_TOKENIZER_FILE).write_text(json.dumps(tokenizer_config(tokenizer), indent=2), encoding="utf-8")
        return {"kind": "hash", "file": HASH_TOKENIZER_FILE, "context_length": tokenizer.context_length}
    if isinstance(tokenizer, HFTokenizer):
        hf = tokenizer.tokenizer
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"ONNX export needs a fast (Rust `tokenizers`) Hugging Face tokenizer, not {type(hf).__name__}")
        if hf.padding_side != "right" or hf.pad_token_id is None:
            raise ValueError(f"ONNX export supports right-padded tokenizers with a pad token ({type(hf).__name__})")
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())  # the model's own tokenizer stays as it is
        length = tokenizer.context_length
        copy.enable_truncation(max_length=length)
        copy.enable_padding(length=length, pad_id=hf.pad_token_id, pad_token=hf.pad_token)
        copy.save(str(folder / TOKENIZER_FILE))
        return {"kind": "hf", "file": TOKENIZER_FILE, "context_length": length}
    raise ValueError(f"ONNX export supports the built-in HashTokenizer and Hugging Face fast tokenizers, not {type(tokenizer).__name__}")


class NumpyHashTokenizer:
    """HashTokenizer with numpy output: ids (B, T) int64, mask (B, T) bool."""

    def __init__(self, tokenizer: HashTokenizer):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return tokenize_numpy(self.tokenizer, texts)


class NumpyHFTokenizer:
    """A `tokenizers` tokenizer.json (padding and truncation saved in it) with numpy output."""

    def __init__(self, path: Path, context_length: int):
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(f"{path} is a Hugging Face tokenizer: pip install tokenizers (or eclip[search])") from error
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: not a readable `tokenizers` tokenizer.json ({error})") from error
        padding = self.tokenizer.padding
        if (self.tokenizer.truncation or {}).get("max_length") != context_length or (padding or {}).get("length") != context_length:
            raise ValueError(f"{path}: padding and truncation must be fixed at the context length {context_length}")
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.context_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=bool).reshape(len(texts), self.context_length)
        return ids, mask


def load_tokenizer(folder: Path, manifest: dict) -> NumpyHashTokenizer | NumpyHFTokenizer:
    """The export's tokenizer, as its manifest names it; an export without that entry (format
    eclip-onnx/1) holds the hash tokenizer's settings in tokenizer.json."""
    entry = manifest.get("tokenizer") or {"kind": "hash", "file": TOKENIZER_FILE}
    path = folder / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export's tokenizer ({entry['kind']}) is missing")
    if entry["kind"] == "hf":
        return NumpyHFTokenizer(path, int(entry["context_length"]))
    if entry["kind"] != "hash":
        raise ValueError(f"{folder / MANIFEST_FILE}: unknown tokenizer kind {entry['kind']!r} (hash or hf)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    if tok.get("kind") != "hash" or tok.get("format", HASH_TOKENIZER_FORMAT) != HASH_TOKENIZER_FORMAT:
        raise ValueError(f"{path}: not an eclip hash tokenizer (kind {tok.get('kind')!r}, format {tok.get('format')!r})")
    try:
        return NumpyHashTokenizer(HashTokenizer(int(tok["vocab_size"]), int(tok["context_length"])))
    except KeyError as error:
        raise ValueError(f"{path}: missing field {error}") from None


def tokenize_numpy(tokenizer: HashTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids (B, T) int64 and mask (B, T) bool in numpy: the ONNX text graph's inputs."""
    ids = np.full((len(texts), tokenizer.context_length), PAD_ID, dtype=np.int64)
    for row, text in enumerate(texts):
        encoded = tokenizer.encode(text)
        ids[row, : len(encoded)] = encoded
    return ids, ids != PAD_ID


# ---------------------------------------------------------------------------- runtime


class OnnxEncoder(Inference):
    """ECLIP's inference methods (`Inference`) on onnxruntime. Inputs and outputs are torch
    tensors, as with `ECLIP`, so the search and serving code takes either; the encoders run in
    onnxruntime. The graph holds the projected tokens only its config's grounding map needs, so
    a map that needs more fails with a clear error."""

    backend = "onnx"

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: not an `eclip export --onnx` folder")
        self.folder = folder
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("format") not in ("eclip-onnx/1", FORMAT):
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r}, this code reads eclip-onnx/1 and {FORMAT}")
        # ids (B, T) int64 and mask (B, T) bool in numpy, as the text graph takes them
        self.tokenizer = load_tokenizer(folder, self.manifest)
        self.config: ModelConfig = from_dict(ModelConfig, json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(str(folder / IMAGE_FILE), options, providers=providers)
        self.text_session = ort.InferenceSession(str(folder / TEXT_FILE), options, providers=providers)
        self.image_outputs: list[str] = self.manifest["image_outputs"]
        self.has_decoder: bool = self.manifest["has_decoder"]
        self.image_size: int = self.manifest["image_size"]
        self.embed_dim: int = self.manifest["embed_dim"]

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> OnnxEncoder:
        return cls(folder, threads)

    # the ECLIP API used by search and serving: eval() and to() are no-ops here
    def eval(self) -> OnnxEncoder:
        return self

    def to(self, *_args, **_kwargs) -> OnnxEncoder:
        return self

    def _run_image(self, images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        values = self.image_session.run(self.image_outputs, {"images": np.ascontiguousarray(array, dtype=np.float32)})
        return dict(zip(self.image_outputs, values))

    def encode_text_numpy(self, texts: list[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        ids, mask = self.tokenizer(texts)
        return self.text_session.run(["embedding"], {"ids": ids, "mask": mask})[0]

    def encode_text(self, texts: list[str] | str | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(texts, tuple):
            ids, mask = (t.cpu().numpy() for t in texts)
            return torch.from_numpy(self.text_session.run(["embedding"], {"ids": ids, "mask": mask.astype(bool)})[0])
        return torch.from_numpy(self.encode_text_numpy(texts))

    def product_embedding_numpy(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        # the graph computes every output; asking for one lets onnxruntime skip nothing, but
        # the decoder is needed for the product embedding anyway
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        return self.image_session.run(["product_embedding"], {"images": np.ascontiguousarray(array, dtype=np.float32)})[0]

    def product_embedding(self, images: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        """The graph's product embedding, read as the config says; another `readout` is
        computed from the graph's other outputs (`Inference.product_embedding`)."""
        if readout is None or readout == self.config.readout:
            return torch.from_numpy(self.product_embedding_numpy(images))
        return super().product_embedding(images, readout)

    def encode_image(self, images: torch.Tensor) -> ImageEncoding:
        out = self._run_image(images)
        t = {name: torch.from_numpy(value) for name, value in out.items()}
        if self.has_decoder:
            tokens = t.get("token_projections", t.get("token_embeddings"))
            grid = tuple(t["attention"].shape[-2:])
            if tokens is not None and tokens.shape[1] != grid[0] * grid[1]:  # attention on a finer level
                ratio = round((grid[0] * grid[1] / tokens.shape[1]) ** 0.5)
                grid = (grid[0] // ratio, grid[1] // ratio)
            return ImageEncoding(t["global_embedding"], t["instances"], t["productness"], t["attention"],
                                 tokens=tokens, grid=grid, product=t["product_embedding"])  # type: ignore[arg-type]
        n = t["token_embeddings"].shape[1]
        h = int(round(n**0.5))
        return ImageEncoding(t["global_embedding"], None, None, None, tokens=t["token_embeddings"], grid=(h, n // h),
                             product=t["product_embedding"])

    def projected_tokens(self, encoding: ImageEncoding, grounding_map: str) -> torch.Tensor:
        """The graph's projected tokens: "token_projections" serve every map, "token_embeddings"
        (normalised) only "similarity", which normalises them anyway."""
        usable = ("token_projections",) if grounding_map == "contribution" else ("token_projections", "token_embeddings")
        if encoding.tokens is None or not any(name in self.image_outputs for name in usable):
            raise ValueError(
                f"this ONNX export cannot ground with grounding_map={grounding_map!r}: its image graph has no "
                f"{' or '.join(usable)} output (export a model whose config has grounding_map={grounding_map!r})"
            )
        return encoding.tokens

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["logit_scale"])
