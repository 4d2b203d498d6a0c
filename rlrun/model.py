"""The policy model: build the tiny one, load any HF causal LM, and pass weights around.

- `build_tiny_model`: a small Llama-architecture causal LM with a character-level tokenizer,
  saved as an ordinary Hugging Face model directory, so that `load_model` reads it with the
  same code as any hub model (`model=tiny` and `model=hf` share one path).
- `encode_prompt`: the one way every job turns prompt text into token ids (`[bos] + text`).
- `save_weights` / `load_weights`: the weights hand-over from trainer to inference, one
  `model.safetensors` per directory, written to a temporary name and renamed into place.

Importing this module imports torch and transformers; jobs that must stay light (the env
workers, `--cfg job`) never import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from rlrun.rundir import model_dir, publish_dir, staging_dir

if TYPE_CHECKING:
    from rlrun.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Printable ASCII (space .. '~') plus newline and tab: one token per character.
BASE_CHARS = "".join(chr(i) for i in range(32, 127)) + "\n\t"


# ---------------------------------------------------------------- the tiny model


def build_tokenizer(alphabet_extra: str = "", model_max_length: int = 64):
    """A character-level tokenizer: every character is one token, decoding joins them as-is.

    A BPE model with no merges splits text into single characters (unknown ones become
    `<unk>`); no pre-tokenizer or normalizer touches spaces, and the `Fuse` decoder
    concatenates tokens, so `decode(encode(s)) == s`. The post-processor adds `<s>` in
    front (like Llama's tokenizers), which `encode_prompt` relies on not happening twice.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(BASE_CHARS + alphabet_extra))  # keep order, drop repeats
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,  # explicit: the saved post-processor prepends <s>
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_tiny_model(out_dir: str | Path, cfg: "ModelConfig", seed: int, alphabet_extra: str = "") -> Path:
    """Build the tiny Llama and its tokenizer, initialised from `seed`, into `out_dir`.

    The directory appears complete or not at all (built under a temporary name, renamed).
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(alphabet_extra, cfg.max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    tmp = staging_dir(out_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, out_dir)
    return out_dir


def resolve_model_path(cfg: "ModelConfig", run_dir: str | Path, seed: int, alphabet_extra: str = "") -> Path:
    """`model_dir`, with the tiny model built there first if it is not yet.

    The jobs that load the model (inference, trainer, SFT) call this at once when a run
    starts, so the build takes a lock: the first one builds, the others wait, then load it.
    """
    path = model_dir(cfg, run_dir)
    if cfg.name == "tiny" and not (path / "config.json").is_file():
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = path.parent / f".{path.name}.lock"
        with open(lock_file, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "config.json").is_file():
                build_tiny_model(path, cfg, seed, alphabet_extra)
                lock_file.unlink()  # whoever still waits on it finds the model built; later callers never lock
    return path


# ---------------------------------------------------------------- loading any causal LM


def policy_path(cfg: Any, run_dir: str | Path) -> Path:
    """The policy RL samples and trains: the SFT stage's output when the run has one, else the model."""
    if cfg.sft.max_steps > 0:
        from rlrun.sft import sft_model_dir

        return sft_model_dir(run_dir)
    return resolve_model_path(cfg.model, run_dir, cfg.seed)


def wait_for_policy(cfg: Any, run_dir: str | Path, timeout_s: float, check: Any = None) -> Path:
    """The policy's directory once a job that loads the model has built it (the orchestrator
    only needs its tokenizer: building the model itself would import transformers' modeling
    code for nothing). `check()` runs between looks and may raise to give up."""
    from rlrun.rundir import wait_for

    if cfg.sft.max_steps > 0:
        from rlrun.sft import sft_model_dir

        path = sft_model_dir(run_dir)
    else:
        path = model_dir(cfg.model, run_dir)
        if cfg.model.name != "tiny":  # a directory or hub id given by the user: nothing to wait for
            return path

    def built() -> bool:
        if check is not None:
            check()
        return (path / "config.json").is_file()

    wait_for(built, f"the policy in {path}", timeout_s, max_poll_s=0.05)
    return path


def _looks_local(path: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper) is a directory."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def _model_name(path: str | Path) -> str:
    """A local directory (checked to exist, `~` expanded) or a hub id, as a string."""
    name = str(path)
    if (isinstance(path, Path) or _looks_local(name)) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model path does not exist: {name}")
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when the model defines none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_name(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load `(model, tokenizer)` from a model directory or hub id; the model is in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars would litter the job logs

    name = _model_name(path)
    tokenizer = load_tokenizer(name, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype if dtype == "auto" else getattr(torch, dtype), trust_remote_code=trust_remote_code
    )
    model.to(device)
    model.eval()
    return model, tokenizer


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt text -> `[bos] + ids(text)`; the single place prompts are tokenized.

    The tokenizer's own special tokens are turned off, so BOS is never added twice; models
    without a BOS token (e.g. Qwen) get just the text ids.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ids if bos is None else [bos, *ids]


def encode_example(tokenizer, example: Any) -> list[int]:
    """An example's prompt as the policy sees it: its chat messages through the tokenizer's chat
    template (with the generation prompt) when the example has messages and the tokenizer a
    template (`model=hf` chat models); else `encode_prompt` of its text. A plain str is text.

    The template's text is tokenized without adding special tokens: templates write their own.
    """
    messages = getattr(example, "messages", None)
    if messages and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return encode_prompt(tokenizer, getattr(example, "prompt", example))


def decode_completion(tokenizer, token_ids: list[int]) -> str:
    """A completion as text with every token it holds, special tokens shown as themselves.

    What the reward functions score, the sample tables show and the logs print: a token the
    policy emitted is never silently dropped (dropping `<pad>` let padding cost nothing).
    """
    return tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


BAN = -100.0  # OpenAI's logit_bias floor: the token's probability underflows to 0


def special_token_bias(tokenizer) -> dict[int, float]:
    """`logit_bias` that keeps a sampler off every special token but EOS (`<pad>`, `<s>`, `<unk>`,
    chat markers): a policy must not hide padding in its completions."""
    eos = tokenizer.eos_token_id
    return {int(i): BAN for i in tokenizer.all_special_ids if i != eos}


def bias_tensor(logit_bias: Mapping[Any, float], width: int, device: Any = "cpu") -> torch.Tensor:
    """A `logit_bias` ({token id: bias}; ids may be JSON's strings) as a dense [width] tensor."""
    bias = torch.zeros(width, dtype=torch.float32, device=device)
    for token, value in logit_bias.items():
        bias[int(token)] = float(value)
    return bias


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a completion (the tokenizer's EOS and the generation config's)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return ids


# ---------------------------------------------------------------- the weights hand-over


def _alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names in `state` that share one storage (tied weights), in state-dict order."""
    groups: dict[tuple[int, int, tuple], list[str]] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def save_weights(model: torch.nn.Module, out_dir: str | Path, metadata: dict[str, str] | None = None,
                 dtype: str | None = None) -> Path:  # fmt: skip
    """Write `model.state_dict()` to `<out_dir>/model.safetensors`, atomically.

    Tied tensors are stored once (safetensors refuses shared storage); `load_weights` puts
    them back. Written to a staging folder and renamed, so a reader never sees half of it.
    `dtype` (e.g. `bfloat16`): floating tensors are cast to it (the reader's dtype; half the
    bytes of fp32 master weights); None keeps the model's.
    """
    model = getattr(model, "module", model)  # DDP-wrapped or not
    state = model.state_dict()
    for names in _alias_groups(state):
        for alias in names[1:]:
            del state[alias]
    cast = getattr(torch, dtype) if dtype else None
    tensors = {k: v.detach().to("cpu", cast if cast is not None and v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}  # fmt: skip
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
    publish_dir(tmp, out_dir)
    return out_dir


def export_pretrained(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, extra: Any = None) -> Path:
    """A complete model directory (`save_pretrained` weights, config, tokenizer): what
    transformers, vLLM and the trackers' model stores load. Written to a staging folder and
    renamed; `extra(tmp)` may add files before that."""
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    getattr(model, "module", model).save_pretrained(tmp)  # DDP-wrapped or not
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    publish_dir(tmp, out_dir)
    return out_dir


def load_weights(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights written by `save_weights` into `model` in place (strict).

    `path` is the directory or the file itself. Missing names are only tolerated where the
    model ties them to a name that is present; any other missing or unexpected name, or a
    wrong shape, raises (a checkpoint of another architecture never loads silently).
    Returns the file's metadata.
    """
    from safetensors import safe_open

    file = Path(path)
    if file.is_dir():
        file = file / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no weights file: {file}")
    tensors = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    model = getattr(model, "module", model)
    expected = model.state_dict()
    for names in _alias_groups(expected):
        present = [n for n in names if n in tensors]
        if present:
            for alias in names:
                tensors.setdefault(alias, tensors[present[0]])
    # Check everything first: load_state_dict would copy the fitting tensors before raising,
    # leaving a half-updated model behind.
    problems = [f"missing {k}" for k in expected.keys() - tensors.keys()]
    problems += [f"unexpected {k}" for k in tensors.keys() - expected.keys()]
    problems += [
        f"size mismatch for {k}: {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        raise RuntimeError(f"weights in {file} do not fit the model: " + "; ".join(sorted(problems)[:5]))
    model.load_state_dict(tensors, strict=True)
    return metadata
