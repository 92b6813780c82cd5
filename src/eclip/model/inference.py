"""Inference on a trained model, written once for every backend.

`Inference` turns an image encoding and text embeddings into what a user asks of the model:
image-text scores, a product embedding, text-guided selection, grounding maps and boxes. A
backend (`ECLIP` in PyTorch, the ONNX runtime's `OnnxEncoder`) provides three primitives:
`encode_image`, `encode_text` and `projected_tokens`, and a `config`. How a decoder model is
read (`readout`) and which map it grounds with (`grounding_map`) are call arguments that
default to the config's; each is checked against its allowed values.

On top of them, the calls for photos and strings: `preprocess`, `encode_images`, `encode_texts`
(batched, under `torch.inference_mode`, numpy out) and `ground(image, text)` on a raw photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..config import ModelConfig
from ..data.transforms import as_pil, preprocess
from .grounding import box_by_rule, upsample_heatmap


@dataclass
class ImageEncoding:
    global_embedding: torch.Tensor  # (B, D), L2-normalised
    instances: torch.Tensor | None  # (B, M, D), L2-normalised; None without a decoder
    productness: torch.Tensor | None  # (B, M) logits
    # (B, M, h, w), each map sums to 1; on the grid of the level the decoder read, which may
    # be finer than `grid`
    attention: torch.Tensor | None
    # (B, N, C) what `projected_tokens` reads: the final visual tokens (PyTorch), or the
    # tokens already projected by the image head (an ONNX graph)
    tokens: torch.Tensor | None
    grid: tuple[int, int]  # (h, w) of `tokens`
    # (B, D) the product embedding under the config's readout, when the backend computed it
    # with the encoding (the ONNX graph does); None: computed on demand
    product: torch.Tensor | None = None

    def take(self, rows: list[int] | torch.Tensor) -> ImageEncoding:
        """The encoding of some of the batch's images, in the order of `rows`."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.global_embedding.device)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return ImageEncoding(
            pick(self.global_embedding), pick(self.instances), pick(self.productness), pick(self.attention),
            pick(self.tokens), self.grid, pick(self.product),
        )


@dataclass
class Grounding:
    heatmaps: torch.Tensor  # (B, H, W) in [0, 1] at the images' resolution
    boxes: list[tuple[float, float, float, float]]  # (x0, y0, x1, y1) as fractions
    # (B,) the selected query; None when the map is not a query's (the baseline, "similarity")
    query_index: torch.Tensor | None


@dataclass
class GroundResult:
    """Where one product is in one photo, in that photo's own pixels."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of width and height
    box_pixels: tuple[int, int, int, int]  # the same box in pixels of the image given
    heatmap: np.ndarray  # (H, W) in [0, 1] at the image's resolution
    query_index: int | None  # the decoder query selected by the text; None for the baseline

    def to_dict(self, heatmap: bool = False) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "heatmap"}
        out["box"], out["box_pixels"] = list(self.box), list(self.box_pixels)
        if heatmap:
            out["heatmap"] = self.heatmap.tolist()
        return out


def _raw_image(image: object) -> Image.Image:
    """A photo given as a PIL image, path, array or (3, H, W) uint8 tensor, as a PIL image."""
    if isinstance(image, torch.Tensor) and image.dim() == 3 and image.dtype == torch.uint8:
        return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    return as_pil(image)


def select_instances(
    instances: torch.Tensor,  # (B, M, D)
    texts: torch.Tensor,  # (T, D)
    mode: str = "softmax",
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-guided selection: the instance score of each image for each text, (B, T), and the
    selection weights over the queries, (B, T, M)."""
    sims = torch.einsum("bmd,td->btm", instances, texts)
    if mode == "softmax":
        weights = (sims / temperature).softmax(dim=-1)
        return (weights * sims).sum(dim=-1), weights
    if mode == "max":
        scores, index = sims.max(dim=-1)
        return scores, F.one_hot(index, sims.shape[-1]).to(sims.dtype)
    raise ValueError(f"unknown selection mode {mode!r} (softmax or max)")


def _with_global(instance: torch.Tensor, global_embedding: torch.Tensor, readout: str) -> torch.Tensor:
    """(B, D) an instance embedding as it is ("instance"), or summed with the global one and
    renormalised ("mix")."""
    return instance if readout == "instance" else F.normalize(instance + global_embedding, dim=-1)


class Inference:
    """Selection, scores, product embedding and grounding on top of a backend's primitives.

    A subclass sets `config` and `image_size` and implements `encode_image`, `encode_text` and
    `projected_tokens`; everything else here is shared, so every backend reads a model the same
    way. The baseline (no decoder) always reads the global head and grounds with "similarity",
    whatever `readout` or `grounding_map` is asked for.
    """

    config: ModelConfig
    image_size: int  # the square input resolution `encode_image` expects (preprocessing resizes to it)

    @property
    def device(self) -> torch.device:
        """Where the backend computes; inputs are moved here, results come back to the CPU."""
        return torch.device("cpu")

    def _prepare(self, device: str | torch.device | None) -> None:
        """Before the photo and string calls: eval mode, and `device` if one is asked for."""
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"{type(self).__name__} runs on {self.device}, not {device}")

    # ------------------------------------------------------------------ primitives

    def encode_image(self, images: torch.Tensor) -> ImageEncoding:
        """images (B, 3, S, S), normalised as `eclip.data.transforms` does."""
        raise NotImplementedError

    def encode_text(self, texts: list[str] | str | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Titles or queries (or token ids and mask) -> (T, D), L2-normalised."""
        raise NotImplementedError

    def projected_tokens(self, encoding: ImageEncoding, grounding_map: str) -> torch.Tensor:
        """(B, N, D) the visual tokens through the image head, not normalised (the maps that
        read them: "similarity" normalises them itself, "contribution" needs their lengths)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ scoring

    def select(self, encoding: ImageEncoding, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) instance scores and (B, T, M) selection weights (`select_instances` with the
        config's selection rule)."""
        if encoding.instances is None:
            raise ValueError("selection needs a model with an instance decoder")
        return select_instances(encoding.instances, texts, self.config.selection, self.config.selection_temperature)

    def image_text_scores(self, encoding: ImageEncoding, texts: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        """(B, T) image-text similarity for zero-shot search and classification: the
        text-guided instance score ("instance"), the global cosine ("global"), or their mean
        ("mix"). `readout` defaults to the config's."""
        readout = self.config.resolve_readout(readout)
        global_scores = encoding.global_embedding @ texts.T
        if readout == "global":
            return global_scores
        instance_scores, _ = self.select(encoding, texts)
        return instance_scores if readout == "instance" else (instance_scores + global_scores) / 2

    def product_embedding_from(self, encoding: ImageEncoding, readout: str | None = None) -> torch.Tensor:
        """(B, D) one unit vector per image, no text needed: the instances weighted by
        productness ("instance"), the global embedding ("global"), or the two summed and
        renormalised ("mix"). `readout` defaults to the config's."""
        asked = readout
        readout = self.config.resolve_readout(readout)
        if encoding.product is not None and asked in (None, self.config.readout):
            return encoding.product
        if readout == "global":
            return encoding.global_embedding
        weights = encoding.productness.softmax(dim=-1)  # (B, M)
        instance = F.normalize(torch.einsum("bm,bmd->bd", weights, encoding.instances), dim=-1)
        return _with_global(instance, encoding.global_embedding, readout)

    @torch.no_grad()
    def product_embedding(self, images: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        """(B, D) `product_embedding_from` of the images."""
        return self.product_embedding_from(self.encode_image(images), readout)

    def text_guided_embedding(self, encoding: ImageEncoding, texts: torch.Tensor, readout: str | None = None) -> torch.Tensor:
        """(B, D) the image side of an image-plus-text query: the instance that text i selects
        in image i rather than the productness choice, combined with the global embedding as
        `readout` says (default: the config's)."""
        readout = self.config.resolve_readout(readout)
        if readout == "global":
            return encoding.global_embedding
        _, weights = self.select(encoding, texts)  # (B, T, M)
        weights = weights[torch.arange(len(texts)), torch.arange(len(texts))]  # (B, M): text i, image i
        instance = F.normalize(torch.einsum("bm,bmd->bd", weights, encoding.instances), dim=-1)
        return _with_global(instance, encoding.global_embedding, readout)

    # ------------------------------------------------------------------ grounding

    def heatmaps_from(
        self, encoding: ImageEncoding, texts: torch.Tensor, grounding_map: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Grid maps (B, h, w) for image i and text i (texts (B, D)), with the selected query's
        index (B,) where the map is a query's. `grounding_map` (default: the config's):
        "similarity", the text's cosine with each projected token (MaskCLIP-style; always for
        the baseline); "attention", the cross-attention of the query the text selects;
        "contribution", that attention times each projected token's dot product with the text.
        Tokens are projected only here, not on every training step."""
        grounding_map = self.config.resolve_grounding_map(grounding_map)
        if grounding_map == "similarity":
            tokens = F.normalize(self.projected_tokens(encoding, grounding_map), dim=-1)
            return torch.einsum("bnd,bd->bn", tokens, texts).unflatten(-1, encoding.grid), None
        sims = torch.einsum("bmd,bd->bm", encoding.instances, texts)
        index = sims.argmax(dim=-1)  # (B,)
        maps = encoding.attention[torch.arange(len(index)), index]  # (B, h, w)
        if grounding_map == "contribution":
            relevance = torch.einsum("bnd,bd->bn", self.projected_tokens(encoding, grounding_map), texts)  # (B, N)
            relevance = relevance.unflatten(-1, encoding.grid)  # (B, h, w) on the final tokens' grid
            if relevance.shape[-2:] != maps.shape[-2:]:  # the decoder read a finer level
                relevance = F.interpolate(relevance.unsqueeze(1), size=maps.shape[-2:], mode="bilinear",
                                          align_corners=False).squeeze(1)
            maps = maps * relevance
        return maps, index

    def box_from_heatmap(self, heatmap: np.ndarray, grounding_map: str | None = None) -> tuple[float, float, float, float]:
        """The box of one upsampled map in [0, 1] (`upsample_heatmap`), by the rule for the map
        it is (`ModelConfig.box_rule`; `grounding_map` defaults to the config's)."""
        return box_by_rule(heatmap, self.config.box_rule(grounding_map))

    @torch.inference_mode()
    def ground(
        self, images: object, texts: str | list[str] | torch.Tensor, grounding_map: str | None = None
    ) -> Grounding | GroundResult:
        """Where the product a text describes is in a photo.

        `ground(photo, "red tee")`: one photo (PIL image, path, array, (3, H, W) uint8 tensor)
        and one text -> `GroundResult`, the box in the photo's pixels and the heat map at its
        resolution (both boxed on the model's input square, as in evaluation).

        `ground(images, texts)`: a preprocessed batch (B, 3, S, S) and a text per image (strings
        or embeddings (B, D)) -> `Grounding`, heat maps at S x S and boxes as fractions."""
        if not (isinstance(images, torch.Tensor) and images.dim() == 4):
            if not isinstance(texts, str):
                raise TypeError(f"ground(photo, text) takes one text as a str, not {type(texts).__name__}")
            return self._ground_photo(_raw_image(images), texts, grounding_map)
        encoding = self.encode_image(images)
        text_emb = self.encode_text(texts) if isinstance(texts, list) else texts
        maps, index = self.heatmaps_from(encoding, text_emb, grounding_map)
        heatmaps = upsample_heatmap(maps, (images.shape[-2], images.shape[-1])).cpu()
        boxes = [self.box_from_heatmap(h.float().numpy(), grounding_map) for h in heatmaps]
        return Grounding(heatmaps=heatmaps, boxes=boxes, query_index=None if index is None else index.cpu())

    def _ground_photo(self, photo: Image.Image, text: str, grounding_map: str | None) -> GroundResult:
        self._prepare(None)
        size = self.image_size
        encoding = self.encode_image(preprocess(photo, size)[None])
        maps, index = self.heatmaps_from(encoding, self.encode_text([text]), grounding_map)
        square = upsample_heatmap(maps, (size, size))[0].float().cpu().numpy()
        box = tuple(float(v) for v in self.box_from_heatmap(square, grounding_map))
        w, h = photo.size
        pixels = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
        heatmap = upsample_heatmap(maps, (h, w))[0].float().cpu().numpy()
        return GroundResult(box, pixels, heatmap, None if index is None else int(index[0]))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ photos and strings

    def preprocess(self, image: object) -> torch.Tensor:
        """The evaluation transform: a photo (PIL image, path, array) -> (3, S, S) input."""
        return preprocess(image, self.image_size)

    def _image_batch(self, images: list) -> torch.Tensor:
        """(B, 3, S, S) inputs: photos preprocessed, float (3, S, S) tensors taken as they are."""
        size = self.image_size
        rows = []
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor) and image.is_floating_point():
                if tuple(image.shape) != (3, size, size):
                    raise ValueError(f"images[{i}]: a float tensor is a preprocessed input (3, {size}, {size}), "
                                     f"not {tuple(image.shape)}; pass uint8 or a PIL image to resize")
                rows.append(image.cpu())
            else:
                try:
                    rows.append(preprocess(image, size))
                except (TypeError, ValueError) as error:
                    raise type(error)(f"images[{i}]: {error}") from error
        return torch.stack(rows)

    @torch.inference_mode()
    def encode_images(
        self,
        images: object,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = False,
        convert_to_numpy: bool = True,
        readout: str | None = None,
    ) -> np.ndarray | torch.Tensor:
        """The product embedding (`readout`, default the config's) of each photo: a list of PIL
        images, paths, arrays or tensors, or a (B, 3, S, S) batch -> (N, D); one photo -> (D,).
        numpy float32, or a CPU tensor with `convert_to_numpy=False`. `device` moves the model."""
        self._prepare(device)
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4
        )
        items = [images] if single else list(images)
        out = []
        for start in tqdm(range(0, len(items), batch_size), desc="images", unit="batch", disable=not progress):
            batch = self._image_batch(items[start : start + batch_size])
            out.append(self.product_embedding_from(self.encode_image(batch), readout).float().cpu())
        result = torch.cat(out) if out else torch.zeros(0, self.config.embed_dim)
        result = result[0] if single else result
        return result.numpy() if convert_to_numpy else result

    @torch.inference_mode()
    def encode_texts(
        self,
        texts: str | Sequence[str],
        batch_size: int = 256,
        device: str | torch.device | None = None,
        progress: bool = False,
        convert_to_numpy: bool = True,
    ) -> np.ndarray | torch.Tensor:
        """Titles or queries -> (T, D) unit vectors; one string -> (D,). numpy float32, or a
        CPU tensor with `convert_to_numpy=False`. `device` moves the model."""
        self._prepare(device)
        single = isinstance(texts, str)
        if not single and not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, not {type(texts).__name__}")
        items = [texts] if single else list(texts)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str")
        out = [
            self.encode_text(items[start : start + batch_size]).float().cpu()
            for start in tqdm(range(0, len(items), batch_size), desc="texts", unit="batch", disable=not progress)
        ]
        result = torch.cat(out) if out else torch.zeros(0, self.config.embed_dim)
        result = result[0] if single else result
        return result.numpy() if convert_to_numpy else result
