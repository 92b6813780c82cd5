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
    tokenizer.json       the HashTokenizer's settings: text is tokenised in plain Python (crc32)
    config.json          the model's config (embedding size, selection rule), as in a model folder
    manifest.json        shapes, selection rule, logit scale and the parity check's max difference
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

from eclip.config import ModelConfig, from_dict, to_dict
from eclip.io import CONFIG_NAME
from eclip.model.eclip import ECLIP
from eclip.model.inference import ImageEncoding, Inference
from eclip.model.tokenizer import CLS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, HashTokenizer

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
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
    max_abs_diff: dict[str, float]  # per output, ONNX against PyTorch on random inputs
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(diff <= self.tolerance for diff in self.max_abs_diff.values())


def export_onnx(model: ECLIP, out: str | Path, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> ExportReport:
    """Export both encoders into `out`, then check them against PyTorch on random inputs of
    two batch sizes (so the dynamic axis is exercised too)."""
    import onnxruntime as ort

    if not isinstance(model.tokenizer, HashTokenizer):
        # tokenizer.json describes the hash tokenizer only; a BPE/WordPiece tower would need its
        # vocabulary shipped too
        raise ValueError(f"ONNX export supports text towers with the built-in HashTokenizer, not {type(model.tokenizer).__name__}")
    model = model.eval().cpu()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    has_decoder = model.decoder is not None
    size = model.image_size
    tokenizer = model.tokenizer
    generator = torch.Generator().manual_seed(seed)

    image_graph, text_graph = ImageEncoderGraph(model).eval(), TextEncoderGraph(model).eval()
    outputs = image_output_names(model.config)
    sample_images = torch.randn(2, 3, size, size, generator=generator)
    sample_ids, sample_mask = tokenizer(["a red striped shirt", "blue jeans"])
    _export(image_graph, (sample_images,), out / IMAGE_FILE, ["images"], outputs)
    _export(text_graph, (sample_ids, sample_mask), out / TEXT_FILE, ["ids", "mask"], ["embedding"])

    diffs: dict[str, float] = {}
    image_session = ort.InferenceSession(str(out / IMAGE_FILE), providers=["CPUExecutionProvider"])
    text_session = ort.InferenceSession(str(out / TEXT_FILE), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        images = torch.randn(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = image_graph(images)
        got = image_session.run(outputs, {"images": images.numpy()})
        for name, e, g in zip(outputs, expected, got):
            diffs[f"image.{name}"] = max(diffs.get(f"image.{name}", 0.0), float(np.abs(e.numpy() - g).max()))
        # random words and random lengths, including an all-padding-but-CLS/EOS text
        texts = [" ".join(f"w{int(w)}" for w in torch.randint(0, 10_000, (int(n),), generator=generator))
                 for n in torch.randint(0, tokenizer.context_length, (batch,), generator=generator)]
        ids, mask = tokenizer(texts)
        with torch.no_grad():
            expected_text = text_graph(ids, mask).numpy()
        got_text = text_session.run(["embedding"], {"ids": ids.numpy(), "mask": mask.numpy()})[0]
        diffs["text.embedding"] = max(diffs.get("text.embedding", 0.0), float(np.abs(expected_text - got_text).max()))

    config = model.config
    (out / CONFIG_NAME).write_text(json.dumps(to_dict(config), indent=2), encoding="utf-8")
    (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer_config(tokenizer), indent=2), encoding="utf-8")
    manifest = {
        "format": "eclip-onnx/1",
        "image_size": size,
        "embed_dim": config.embed_dim,
        "context_length": tokenizer.context_length,
        "has_decoder": has_decoder,
        "selection": config.selection,
        "selection_temperature": config.selection_temperature,
        "logit_scale": float(model.logit_scales["global"]().item()),
        "image_outputs": outputs,
        "normalisation": {"mean": 0.5, "std": 0.5, "resize": "bicubic, squashed to a square"},
        "opset": OPSET,
        "max_abs_diff": diffs,
        "tolerance": tolerance,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return ExportReport(out, diffs, tolerance)


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_config(tokenizer: HashTokenizer) -> dict:
    """Everything needed to reproduce `HashTokenizer` without this package: lower-case, take
    the words matching `word_pattern`, keep the first context_length - 2, map each word to
    num_special + crc32(utf-8) % (vocab_size - num_special), wrap in CLS ... EOS, pad with PAD."""
    return {
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
        tok = json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
        if tok.get("kind") != "hash":
            raise ValueError(f"unsupported tokenizer kind {tok.get('kind')!r} in {folder}")
        self.tokenizer = HashTokenizer(tok["vocab_size"], tok["context_length"])
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
        ids, mask = tokenize_numpy(self.tokenizer, texts)
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
            grid = tuple(t["attention"].shape[-2:])
            tokens = t.get("token_projections", t.get("token_embeddings"))
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
