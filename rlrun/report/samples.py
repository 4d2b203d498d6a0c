"""A token browser: `python -m rlrun.report <run> --samples` -> `<run>/samples.html`.

One static page (inline CSS and JS, no server, nothing fetched) of the rollouts of a few
steps whose batches are still on disk (`rollouts/step_<n>/`, the newest
`orchestrator.keep_last`). For each rollout: the prompt, and the completion token by token,
each token coloured by a value picked with a switch in the page:

- logprob: the sampler's log p(token), `old_logprobs` in the batch;
- advantage: the sequence's (the same for all its tokens);
- importance ratio, exp(trainer - sampler logprob), and mismatch, |trainer - sampler|: the
  trainer's logprobs are not on disk, so they are recomputed here with the weights that
  trained the step (`weights/step_<n-1>`; step 1: the initial policy, `policy_path`), through
  the trainer's own `token_logprobs` with the batch's temperature and `logit_bias` (on the
  CPU, in `model.dtype`: a GPU trainer's own numbers may differ in the last digits). A step
  whose weights are gone (`trainer.keep_last`) has them greyed out, with the reason. The
  trainer's own `mismatch/*` metrics of the step, when it logged them, are shown beside.

Rewards are not in the batch. They come from the orchestrator's `samples` records
(`log_extras.samples`) of the step, matched to batch rows by completion text, lengths and
advantage; the rows they cover (and their env) are shown first. Other rows show their
advantage only: a group-normalized advantage does not give the reward back.

Each token is decoded alone with special tokens kept (`</s>` shows as `</s>`), HTML-escaped.
Byte-level tokenizers may show a lone token of a multi-byte character as `�`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlrun.report.data import NotARun
from rlrun.tracking.record import read_records, record_path

OUT_FILE = "samples.html"
DEFAULT_MAX_ROLLOUTS = 16  # rollouts shown per step
DEFAULT_MAX_STEPS = 5  # steps shown when none are asked for: the newest on disk
MODES = (  # (key, label) of the switch; the key is the token's data attribute JS reads
    ("logprob", "logprob"),
    ("advantage", "advantage"),
    ("ratio", "importance ratio"),
    ("mismatch", "mismatch"),
)


@dataclass
class Token:
    id: int
    text: str
    special: bool
    logprob: float  # the sampler's
    trainer: float | None  # the trainer's logprob, None when its weights are gone


@dataclass
class RolloutView:
    row: int  # index in the batch
    group: int | None
    prompt: str
    prompt_tokens: int
    tokens: list[Token]
    advantage: float
    finish: str  # length | stop | unknown
    record: dict[str, Any] | None = None  # the orchestrator's samples row (reward, env, ...) when logged


@dataclass
class StepView:
    step: int
    meta: dict[str, Any]
    rows: int  # in the batch
    rollouts: list[RolloutView] = field(default_factory=list)
    trainer_source: str = ""  # which weights gave the trainer logprobs
    trainer_missing: str = ""  # why there are none ('' when there are)
    samples_note: str = ""
    logged: dict[str, float] = field(default_factory=dict)  # the trainer's own mismatch/* metrics of the step
    bias: list[tuple[int, str, float]] = field(default_factory=list)  # the sampler's logit_bias: (id, token, bias)


# ---------------------------------------------------------------- reading


def _run_config(run_dir: Path) -> Any | None:
    try:
        from rlrun.config import load_run_config

        return load_run_config(run_dir / "config.yaml")
    except Exception:
        return None


def _samples_rows(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """The orchestrator's logged sample rows per step (a step logged twice, e.g. redone after a resume: the last)."""
    rows: dict[int, list[dict[str, Any]]] = {}
    for record in read_records(record_path(run_dir, "orchestrator"), "samples"):
        rows[int(record.get("step", -1))] = [r for r in record.get("rows", []) if isinstance(r, dict)]
    return rows


def _logged_mismatch(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for record in read_records(record_path(run_dir, "trainer"), "metrics"):
        m = {k: float(v) for k, v in record.get("metrics", {}).items()
             if k.startswith("mismatch/") and isinstance(v, (int, float))}  # fmt: skip
        if m:
            out[int(record["step"])] = m
    return out


def choose_steps(on_disk: list[int], asked: list[int] | None) -> list[int]:
    """The steps to show: those asked for (all of them, missing ones reported), else the newest on disk."""
    if asked:
        return sorted(set(asked))
    return on_disk[-DEFAULT_MAX_STEPS:]


def _match(record_rows: list[dict[str, Any]], texts: list[str], prompts: list[str], lengths: list[tuple[int, int]],
           advantages: list[float]) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Batch row -> the samples row logged for it: same completion text, token counts and advantage
    (the prompt text found in the decoded prompt breaks ties); each batch row used once."""
    matched: dict[int, dict[str, Any]] = {}
    for rec in record_rows:
        candidates = [
            i for i in range(len(texts))
            if i not in matched and texts[i] == rec.get("completion")
            and lengths[i] == (rec.get("prompt_tokens"), rec.get("completion_tokens"))
            and math.isclose(advantages[i], float(rec.get("advantage", math.nan)), rel_tol=1e-5, abs_tol=1e-6)
        ]  # fmt: skip
        if candidates:
            exact = [i for i in candidates if str(rec.get("prompt", "\0")) in prompts[i]]
            matched[(exact or candidates)[0]] = rec
    return matched


class _Policy:
    """The policy's architecture, loaded once; each step's trainer weights loaded into it."""

    def __init__(self, cfg: Any, run_dir: Path) -> None:
        from rlrun.model import load_model, policy_path

        self.cfg, self.run_dir = cfg, run_dir
        self.initial = policy_path(cfg, run_dir)
        self.device = "cpu"  # never a GPU: a live run's jobs may hold them all
        self.model, self.tokenizer = load_model(self.initial, cfg.model.dtype, self.device, cfg.model.trust_remote_code)
        self.loaded: str | None = None

    def weights_for(self, step: int) -> tuple[Path | None, str]:
        """The weights that trained `step` (the policy after step-1 updates) and how to name them."""
        prev = self.run_dir / "weights" / f"step_{step - 1}"
        if prev.is_dir():
            return prev, f"weights/step_{step - 1} (the policy after {step - 1} update{'s' * (step != 2)})"
        if step == 1 and not self.cfg.get("resume_from"):
            return None, f"the initial policy {self.initial}"
        return None, ""

    def logprobs(self, step: int, batch: dict[str, Any], meta: dict[str, Any], rows: list[int]) -> tuple[Any, str, str]:
        """(trainer logprobs [len(rows), T-1] on the CPU | None, source, why missing)."""
        import torch

        from rlrun.model import bias_tensor, load_weights
        from rlrun.trainer.step import token_logprobs

        path, source = self.weights_for(step)
        if not source:
            keep = self.cfg.trainer.keep_last
            return None, "", (f"weights/step_{step - 1} is no longer on disk (trainer.keep_last={keep} keeps the "
                              "newest); the trainer's logprobs cannot be recomputed")  # fmt: skip
        key = str(path or self.initial)
        try:
            if self.loaded != key:
                if path is None:
                    from rlrun.model import load_model

                    self.model = load_model(self.initial, self.cfg.model.dtype, self.device,
                                            self.cfg.model.trust_remote_code)[0]  # fmt: skip
                else:
                    load_weights(self.model, path)
                self.loaded = key
            # As the trainer's `_wait_for_batch` and `_logit_bias`: the batch's temperature (greedy: 1).
            temperature = float(meta.get("temperature", self.cfg.orchestrator.temperature))
            temperature = temperature if temperature > 0 else 1.0
            bias = None
            if meta.get("logit_bias"):
                width = self.model.get_output_embeddings().weight.shape[0]
                bias = bias_tensor(meta["logit_bias"], int(width), self.device)
            width = batch["input_ids"].shape[1]
            out = torch.zeros(len(rows), width - 1)
            for k, row in enumerate(rows):  # one row at a time: [T, vocab] logits, not [rows, T, vocab]
                length = int(batch["attention_mask"][row].sum())
                ids = batch["input_ids"][row : row + 1, :length].to(self.device)
                mask = batch["attention_mask"][row : row + 1, :length].to(self.device)
                with torch.no_grad():
                    lp, _ = token_logprobs(self.model, ids, mask, temperature, bias)
                out[k, : length - 1] = lp[0].float().cpu()
            return out, f"{source}, on the CPU in {self.cfg.model.dtype}", ""
        except Exception as exc:  # weights pruned while reading, or of another shape
            return None, "", f"loading {key} failed: {type(exc).__name__}: {exc}"


def load_steps(run_dir: Path, steps: list[int] | None = None,
               max_rollouts: int = DEFAULT_MAX_ROLLOUTS) -> tuple[list[StepView], list[str]]:  # fmt: skip
    """The chosen steps' rollouts (up to `max_rollouts` each) and notes about steps that are not on disk."""
    from rlrun.batch import read_batch, rollouts_root
    from rlrun.rundir import list_steps

    on_disk = list_steps(rollouts_root(run_dir))
    chosen = choose_steps(on_disk, steps)
    notes = [f"step {s}: its rollouts are not on disk (orchestrator.keep_last keeps the newest; on disk: "
             f"{', '.join(map(str, on_disk)) or 'none'})" for s in chosen if s not in on_disk]  # fmt: skip
    chosen = [s for s in chosen if s in on_disk]
    if not chosen:
        raise NotARun(f"{run_dir}: no rollouts to show (" + ("; ".join(notes) or "no rollouts/step_<n> on disk") + ")")
    cfg = _run_config(run_dir)
    policy: _Policy | None = None
    policy_error = "" if cfg is not None else f"{run_dir / 'config.yaml'} could not be loaded"
    if cfg is not None:
        try:
            policy = _Policy(cfg, run_dir)
        except Exception as exc:
            policy_error = f"the policy could not be loaded: {type(exc).__name__}: {exc}"
    from rlrun.model import decode_completion, load_tokenizer, policy_path

    if policy is not None:
        tokenizer = policy.tokenizer
    else:  # still decode, with the policy's tokenizer (the run's tiny model when the config is unreadable)
        try:
            tokenizer = load_tokenizer(run_dir / "model" if cfg is None else policy_path(cfg, run_dir))
        except Exception as exc:
            raise NotARun(f"{run_dir}: no tokenizer to decode the rollouts with ({policy_error}; "
                          f"{type(exc).__name__}: {exc})") from None  # fmt: skip

    logged_samples, logged_mismatch = _samples_rows(run_dir), _logged_mismatch(run_dir)
    special = set(int(i) for i in tokenizer.all_special_ids)
    group_size = int(cfg.orchestrator.group_size) if cfg is not None else None
    pieces: dict[int, str] = {}

    def piece(token: int) -> str:
        if token not in pieces:
            pieces[token] = decode_completion(tokenizer, [token])
        return pieces[token]

    views = []
    for step in chosen:
        try:
            batch, meta = read_batch(run_dir, step)
        except Exception as exc:  # pruned between listing and reading
            notes.append(f"step {step}: its batch could not be read ({type(exc).__name__}: {exc})")
            continue
        ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        n = int(ids.shape[0])
        spans = []  # (prompt ids, completion positions) per row
        for i in range(n):
            positions = loss_mask[i].nonzero().flatten().tolist()
            start = positions[0] if positions else int(attn[i].sum())
            spans.append((ids[i, :start].tolist(), positions))
        texts = [decode_completion(tokenizer, ids[i, pos].tolist()) for i, (_, pos) in enumerate(spans)]
        prompts = [decode_completion(tokenizer, p) for p, _ in spans]
        lengths = [(len(p), len(pos)) for p, pos in spans]
        advantages = [float(a) for a in batch["advantages"]]
        records = logged_samples.get(step)
        matched = _match(records or [], texts, prompts, lengths, advantages)
        rows = (list(matched) + [i for i in range(n) if i not in matched])[:max_rollouts]
        rows.sort()
        bias = sorted((int(k), piece(int(k)), float(v)) for k, v in (meta.get("logit_bias") or {}).items())
        view = StepView(step, meta, n, logged=logged_mismatch.get(step, {}), bias=bias)
        if records is None:
            view.samples_note = ("no samples logged for this step (log_extras.samples off, or not a log_extras.interval "
                                 "step): rewards unknown, advantages only")  # fmt: skip
        elif len(matched) == n:
            view.samples_note = f"rewards of all {n} rollouts from the orchestrator's samples record"
        else:
            view.samples_note = (f"rewards from the orchestrator's samples record: {len(matched)} of the batch's "
                                 f"{n} rollouts (log_extras.samples_per_step); the others: advantage only")  # fmt: skip
        trainer = None
        if policy is not None:
            trainer, view.trainer_source, view.trainer_missing = policy.logprobs(step, batch, meta, rows)
        else:
            view.trainer_missing = policy_error
        truncated = batch.get("truncated")
        for k, i in enumerate(rows):
            prompt_ids, positions = spans[i]
            tokens = [
                Token(int(ids[i, t]), piece(int(ids[i, t])), int(ids[i, t]) in special, float(batch["old_logprobs"][i, t]),
                      None if trainer is None else float(trainer[k, t - 1]))
                for t in positions
            ]  # fmt: skip
            finish = "unknown" if truncated is None else ("length" if float(truncated[i]) >= 0.5 else "stop")
            view.rollouts.append(RolloutView(i, None if not group_size else i // group_size, prompts[i], len(prompt_ids),
                                             tokens, advantages[i], finish, matched.get(i)))  # fmt: skip
        views.append(view)
    return views, notes


# ---------------------------------------------------------------- the page

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:2px solid #ccc}
.bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
.bar label{margin-right:1em;cursor:pointer}
.legend{display:inline-block;vertical-align:middle;margin-left:1em;font-size:12px}
.legend .g{display:inline-block;width:180px;height:12px;vertical-align:middle;border:1px solid #aaa;margin:0 .4em}
.note{font-size:13px;color:#555;margin:.2em 0}.na{color:#a33}
.r{border:1px solid #ddd;border-radius:4px;margin:.8em 0;padding:.4em .6em}
.h{font-size:13px;margin-bottom:.3em}.h b{margin-right:.2em}.h span{margin-right:1em}
.p{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap;color:#555;background:#f6f6f6;
   padding:.2em .4em;margin:.2em 0}
.c{font-family:ui-monospace,monospace;font-size:14px;white-space:pre-wrap;line-height:1.7}
.t{padding:1px 0;border-right:1px solid rgba(0,0,0,.08)}.t.s{outline:1px solid #333;font-weight:bold}
.t.x{background:#e6e6e6!important;color:#999}
table{border-collapse:collapse;font-size:12px;margin:.3em 0}td,th{border:1px solid #ccc;padding:1px 6px}
"""

SCRIPT = """
(function(){
const toks=[...document.querySelectorAll('.t')];
const num=s=>s===undefined||s===''?NaN:Number(s);
for(const t of toks){t._l=num(t.dataset.l);t._t=num(t.dataset.t);t._a=num(t.closest('.r').dataset.a);
  t._r=Math.exp(t._t-t._l);t._m=Math.abs(t._t-t._l);}
const f=(v,d)=>isNaN(v)?'n/a':v.toPrecision(d||5);
for(const t of toks){const na=isNaN(t._t)?' (no trainer weights for this step)':'';
  t.title='id '+t.dataset.i+' '+JSON.stringify(t.textContent)+'\\nlogprob '+f(t._l)+' (p '+f(Math.exp(t._l),4)+
  ')\\nadvantage '+f(t._a)+'\\nimportance ratio '+f(t._r)+na+'\\nmismatch '+f(t._m)+na+
  '\\ntrainer logprob '+f(t._t)+na;}
const top=(a,floor)=>a.reduce((m,v)=>isFinite(v)&&v>m?v:m,floor);  // no spread: pages hold many tokens
const lmax=Math.min(20,top(toks.map(t=>-t._l),1));  // logprobs from -lmax (red) to 0 (green)
const amax=top(toks.map(t=>Math.abs(t._a)),1e-6);
const rmax=top(toks.map(t=>Math.abs(Math.log(t._r))),1e-6);
const mmax=top(toks.map(t=>t._m),1e-9);
const div=(x,pos,neg)=>{x=Math.max(-1,Math.min(1,x));const c=x>=0?pos:neg,a=Math.abs(x);
  return 'rgb('+c.map(v=>Math.round(255+(v-255)*a)).join(',')+')';};
const modes={
 logprob:{v:t=>t._l,c:v=>'hsl('+Math.round(120*Math.max(0,1+v/lmax))+',75%,78%)',lo:(-lmax).toPrecision(3),hi:'0',
   g:'linear-gradient(90deg,hsl(0,75%,78%),hsl(60,75%,78%),hsl(120,75%,78%))'},
 advantage:{v:t=>t._a,c:v=>div(v/amax,[60,170,60],[220,60,60]),lo:'-'+amax.toPrecision(3),hi:'+'+amax.toPrecision(3),
   g:'linear-gradient(90deg,rgb(220,60,60),#fff,rgb(60,170,60))'},
 ratio:{v:t=>t._r,c:v=>div(Math.log(v)/rmax,[50,110,230],[240,140,30]),lo:Math.exp(-rmax).toPrecision(4),
   hi:Math.exp(rmax).toPrecision(4),g:'linear-gradient(90deg,rgb(240,140,30),#fff,rgb(50,110,230))'},
 mismatch:{v:t=>t._m,c:v=>div(v/mmax,[150,60,200],[150,60,200]),lo:'0',hi:mmax.toPrecision(3),
   g:'linear-gradient(90deg,#fff,rgb(150,60,200))'}};
function paint(name){const m=modes[name];
 for(const t of toks){const v=m.v(t);if(isNaN(v)){t.classList.add('x');t.style.background='';}
   else{t.classList.remove('x');t.style.background=m.c(v);}}
 document.getElementById('lo').textContent=m.lo;document.getElementById('hi').textContent=m.hi;
 document.getElementById('grad').style.background=m.g;}
for(const r of document.querySelectorAll('input[name=mode]'))r.addEventListener('change',e=>paint(e.target.value));
paint(document.querySelector('input[name=mode]:checked').value);
})();
"""


def _num(value: float | None) -> str:
    """A value as JS reads it back: 9 significant digits round-trip a float32 exactly."""
    return "" if value is None or not math.isfinite(value) else f"{value:.9g}"


def _visible(text: str) -> str:
    """A token's text for the page: escaped; newline and tab marked (and the newline kept)."""
    return html.escape(text).replace("\t", "→\t").replace("\n", "↵\n")


def _rollout_html(step: StepView, r: RolloutView) -> str:
    e = html.escape
    rec = r.record or {}
    head = [f"<b>row {r.row}</b>"]
    if r.group is not None:
        head.append(f"<span>group {r.group}</span>")
    if "env" in rec and rec["env"] is not None:
        head.append(f"<span>env <b>{e(str(rec['env']))}</b></span>")
    if "reward" in rec:
        fns = [k for k in rec if k not in ("step", "selected_as", "env", "prompt", "completion", "reward", "advantage",
                                            "prompt_tokens", "completion_tokens")]  # fmt: skip
        parts = ", ".join(f"{e(k)} {_fmt(rec[k])}" for k in fns)
        head.append(f"<span>reward <b>{_fmt(rec['reward'])}</b>{' (' + parts + ')' if parts else ''}</span>")
    else:
        head.append("<span class='note'>reward not logged</span>")
    head.append(f"<span>advantage <b>{r.advantage:+.4g}</b></span>")
    head.append(f"<span>finish <b>{r.finish}</b></span>")
    head.append(f"<span>{r.prompt_tokens} prompt + {len(r.tokens)} completion tokens</span>")
    if rec.get("selected_as"):
        head.append(f"<span class='note'>logged as {e(str(rec['selected_as']))}</span>")
    tokens = "".join(
        f"<span class='t{' s' if t.special else ''}' data-i='{t.id}' data-l='{_num(t.logprob)}' "
        f"data-t='{_num(t.trainer)}'>{_visible(t.text)}</span>"
        for t in r.tokens
    )
    return (f"<div class='r' data-step='{step.step}' data-row='{r.row}' data-a='{_num(r.advantage)}'>"
            f"<div class='h'>{' '.join(head)}</div><div class='p'>{e(r.prompt)}</div>"
            f"<div class='c'>{tokens}</div></div>")  # fmt: skip


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    return f"{v:.4g}" if math.isfinite(v) else "–"


def _step_html(view: StepView) -> str:
    e = html.escape
    meta = view.meta
    banned = ", ".join(f"{e(text)} ({token}: {value:+g})" for token, text, value in view.bias)
    lines = [
        f"<h2 id='step-{view.step}'>step {view.step}</h2>",
        f"<p class='note'>sampled by policy v{e(str(meta.get('policy_version', '?')))} at temperature "
        f"{e(str(meta.get('temperature', '?')))}{'; logit_bias: ' + banned if banned else ''}. "
        f"{len(view.rollouts)} of {view.rows} rollouts shown.</p>",
    ]
    version = meta.get("policy_version")
    if isinstance(version, int) and version < view.step - 1:  # the trainer's weights are version step - 1
        lag = view.step - 1 - version
        lines.append(f"<p class='note'>sampled {lag} update{'s' * (lag > 1)} behind the weights that trained it: "
                     "the ratio and mismatch include the policy's change since, not only the sampler's "
                     "numerics.</p>")  # fmt: skip
    if view.trainer_missing:
        lines.append(f"<p class='note na'>importance ratio and mismatch not available: {e(view.trainer_missing)}</p>")
    else:
        lines.append(f"<p class='note'>trainer logprobs recomputed with {e(view.trainer_source)}.</p>")
    if view.logged:
        cells = "".join(f"<th>{e(k.removeprefix('mismatch/'))}</th>" for k in view.logged)
        values = "".join(f"<td>{_fmt(v)}</td>" for v in view.logged.values())
        lines.append(f"<p class='note'>the trainer's own mismatch metrics of this step (over its whole batch):</p>"
                     f"<table><tr>{cells}</tr><tr>{values}</tr></table>")  # fmt: skip
    lines.append(f"<p class='note'>{e(view.samples_note)}</p>")
    lines += [_rollout_html(view, r) for r in view.rollouts]
    return "\n".join(lines)


def write_samples(run_dir: Path, steps: list[int] | None = None, max_rollouts: int = DEFAULT_MAX_ROLLOUTS,
                  out: Path | None = None) -> Path:  # fmt: skip
    """Write the token browser of `run_dir` to `out` (default `<run>/samples.html`); its path."""
    views, notes = load_steps(run_dir, steps, max_rollouts)
    e = html.escape
    title = f"rlrun samples: {Path(*run_dir.resolve().parts[-2:])}"
    switch = "".join(
        f"<label><input type='radio' name='mode' value='{key}'{' checked' if i == 0 else ''}> {label}</label>"
        for i, (key, label) in enumerate(MODES)
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<p class='note'>Completion tokens coloured by the value chosen below; hover a token for its id and "
        "every value. <b>logprob</b>: the sampler's. <b>advantage</b>: the sequence's. <b>importance ratio</b> = "
        "exp(trainer − sampler logprob) and <b>mismatch</b> = |trainer − sampler logprob|, the trainer's logprob "
        "recomputed with the weights that trained the step (grey: not available). Rewards only where the "
        "orchestrator logged the rollout (log_extras.samples). Boxed tokens are special tokens. "
        f"Steps: {', '.join(f'<a href=#step-{v.step}>{v.step}</a>' for v in views)}.</p>",
        *(f"<p class='note na'>{e(n)}</p>" for n in notes),
        f"<div class='bar'>colour by: {switch}<span class='legend'><span id='lo'></span><span class='g' id='grad'>"
        "</span><span id='hi'></span></span></div>",
        *(_step_html(v) for v in views),
        f"<script>{SCRIPT}</script></body></html>",
    ]
    out = out or run_dir / OUT_FILE
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def parse_steps(text: str) -> list[int]:
    """`--steps 10,20` -> [10, 20]."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps takes step numbers separated by commas, not {text!r}") from None


__all__ = ["load_steps", "parse_steps", "write_samples"]
