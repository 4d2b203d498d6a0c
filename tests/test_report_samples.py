"""`python -m rlrun.report <run> --samples`: the token browser of a real run, checked as HTML and
in a real headless Chromium (a screenshot that is not blank, the DOM after its script ran)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT, records, run_app

from rlrun.batch import read_batch

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
STEPS = 3
MODES = {"logprob", "advantage", "ratio", "mismatch"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed by scripts/install_chromium.sh when missing (skip only if it cannot be)."""
    if not CHROMIUM.exists():
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        if proc.returncode == 2:  # the script's "cannot install here" (not root, no apt-get)
            pytest.skip(f"chromium is not installed and cannot be: {proc.stderr.strip()}")
        assert proc.returncode == 0, f"installing chromium failed:\n{proc.stdout}\n{proc.stderr}"
    assert CHROMIUM.exists()
    return CHROMIUM


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny real run: 3 steps, all kept, every step's samples logged; long enough completions
    (max_tokens=32) that some end with </s>."""
    run_dir = tmp_path_factory.mktemp("samples") / "run"
    proc = run_app(run_dir, "sft.max_steps=0", f"max_steps={STEPS}", "orchestrator.batch_size=4",
                   "orchestrator.group_size=2", "orchestrator.keep_last=3", "orchestrator.max_tokens=32",
                   "log_extras=samples", "log_extras.interval=1", timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def report(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlrun.report", str(run_dir), "--samples", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


@pytest.fixture(scope="module")
def page(run: Path) -> Path:
    proc = report(run)
    assert proc.returncode == 0, proc.stderr
    out = run / "samples.html"
    assert proc.stdout.strip() == str(out)
    return out


class Page(HTMLParser):
    """What the page shows: each rollout's header text and tokens, the switch's options, the steps."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rollouts: dict[tuple[int, int], dict] = {}
        self.modes: list[str] = []
        self.steps: list[int] = []
        self.notes: list[str] = []
        self._rollout: dict | None = None
        self._token: dict | None = None
        self._header = False
        self._note: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "input" and a.get("name") == "mode":
            self.modes.append(a["value"])
        elif tag == "h2" and (a.get("id") or "").startswith("step-"):
            self.steps.append(int(a["id"].removeprefix("step-")))
        elif tag == "div" and "r" in cls:
            self._rollout = {"attrs": a, "tokens": [], "header": ""}
            self.rollouts[(int(a["data-step"]), int(a["data-row"]))] = self._rollout
        elif tag == "div" and "h" in cls:
            self._header = True
        elif tag == "span" and "t" in cls:
            self._token = {"attrs": a, "special": "s" in cls, "text": ""}
            self._rollout["tokens"].append(self._token)
        elif tag == "p" and "note" in cls:
            self._note = []

    def handle_endtag(self, tag):
        if tag == "span":
            self._token = None
        elif tag == "div":
            self._header = False
        elif tag == "p" and self._note is not None:
            self.notes.append("".join(self._note))
            self._note = None

    def handle_data(self, data):
        if self._token is not None:
            self._token["text"] += data
        elif self._header and self._rollout is not None:
            self._rollout["header"] += data
        if self._note is not None:
            self._note.append(data)


def plain(text: str) -> str:
    """A token as the page shows it, without the marks for newline and tab."""
    return text.replace("↵\n", "\n").replace("→\t", "\t")


def f32(text: str) -> float:
    """A value of the page as float32 (it holds float32 values to 9 digits, which round-trip exactly)."""
    import torch

    return torch.tensor(float(text), dtype=torch.float32).item()


def tokenizer(run_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir / "model")


# ---------------------------------------------------------------- the page


def test_page_shows_every_kept_step_and_its_tokens(run: Path, page: Path) -> None:
    shown = Page(page.read_text(encoding="utf-8"))
    assert set(shown.modes) == MODES and len(shown.modes) == 4
    kept = sorted(int(p.name.removeprefix("step_")) for p in (run / "rollouts").glob("step_*"))
    assert kept == [1, 2, 3] and shown.steps == kept
    tok = tokenizer(run)
    samples = {r["step"]: r["rows"] for r in records(run, "orchestrator", "samples")}
    ends_with_eos = 0
    for step in kept:
        batch, meta = read_batch(run, step)
        for row in range(batch["input_ids"].shape[0]):  # 8 rows: all shown (16 per step at most)
            r = shown.rollouts[(step, row)]
            positions = batch["loss_mask"][row].nonzero().flatten().tolist()
            ids = batch["input_ids"][row, positions].tolist()
            assert [int(t["attrs"]["data-i"]) for t in r["tokens"]] == ids
            assert [plain(t["text"]) for t in r["tokens"]] == [tok.decode([i], skip_special_tokens=False) for i in ids]
            assert "".join(plain(t["text"]) for t in r["tokens"]) == tok.decode(ids, skip_special_tokens=False)
            for t, p in zip(r["tokens"], positions):  # the sampler's logprob, exactly (float32 round trip)
                assert f32(t["attrs"]["data-l"]) == batch["old_logprobs"][row, p].item()
            assert f32(r["attrs"]["data-a"]) == batch["advantages"][row].item()
            stopped = float(batch["truncated"][row]) == 0.0
            assert f"finish {'stop' if stopped else 'length'}" in r["header"]
            if stopped and ids[-1] == tok.eos_token_id:
                assert r["tokens"][-1]["text"] == "</s>" and r["tokens"][-1]["special"]
                ends_with_eos += 1
        for logged in samples[step]:  # rewards (and env) of every rollout the orchestrator logged
            assert any(f"reward {logged['reward']:.4g}" in r["header"] and f"env {logged['env']}" in r["header"]
                       and "".join(plain(t["text"]) for t in r["tokens"]) == logged["completion"]
                       for (s, _), r in shown.rollouts.items() if s == step), logged  # fmt: skip
    assert ends_with_eos > 0, "no completion ended with </s>: the check of special tokens did not run"
    assert "</s>" not in page.read_text(encoding="utf-8").replace("&lt;/s&gt;", "")  # escaped, never raw markup


def test_trainer_values_recomputed_independently(run: Path, page: Path) -> None:
    """Step 2's trainer logprob of one token from weights/step_1 by hand; every step's mismatch
    against what the trainer itself logged (`mismatch/*`) when it logs it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    shown = Page(page.read_text(encoding="utf-8"))
    batch, meta = read_batch(run, 2)
    row = 0
    positions = batch["loss_mask"][row].nonzero().flatten().tolist()
    t = positions[len(positions) // 2]
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(load_file(str(run / "weights" / "step_1" / "model.safetensors")),
                                                strict=False)  # fmt: skip
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    model.tie_weights()
    length = int(batch["attention_mask"][row].sum())
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][row : row + 1, :length]).logits[0, t - 1].double()
    for token, bias in meta["logit_bias"].items():
        logits[int(token)] += bias
    expected = torch.log_softmax(logits / meta["temperature"], -1)[int(batch["input_ids"][row, t])].item()
    token = shown.rollouts[(2, row)]["tokens"][positions.index(t)]["attrs"]
    assert float(token["data-t"]) == pytest.approx(expected, abs=1e-4)
    assert f32(token["data-l"]) == batch["old_logprobs"][row, t].item()

    logged = {r["step"]: r["metrics"] for r in records(run, "trainer", "metrics")}
    for step in range(1, STEPS + 1):
        diffs = [abs(float(t["attrs"]["data-t"]) - float(t["attrs"]["data-l"]))
                 for (s, _), r in shown.rollouts.items() if s == step for t in r["tokens"]]  # fmt: skip
        assert diffs and all(math.isfinite(d) for d in diffs)
        if "mismatch/logprob_diff_max" in logged[step]:  # the trainer's own forward, over the same 8 rows
            assert max(diffs) == pytest.approx(logged[step]["mismatch/logprob_diff_max"], rel=1e-3, abs=1e-5)
            assert sum(diffs) / len(diffs) == pytest.approx(logged[step]["mismatch/logprob_diff_mean"], rel=1e-3,
                                                           abs=1e-6)  # fmt: skip


def test_steps_cap_and_missing_weights(run: Path, tmp_path: Path) -> None:
    """--steps/--max-rollouts; a step whose trainer weights are gone has ratio and mismatch greyed out."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "weights" / "step_1")  # the weights that trained step 2
    proc = report(copy, "--steps", "2,3,99", "--max-rollouts", "3")
    assert proc.returncode == 0, proc.stderr
    shown = Page((copy / "samples.html").read_text(encoding="utf-8"))
    assert shown.steps == [2, 3]
    assert any("step 99" in n and "not on disk" in n for n in shown.notes)
    assert any("not available" in n and "weights/step_1" in n for n in shown.notes)
    for step in (2, 3):
        rows = [r for (s, _), r in shown.rollouts.items() if s == step]
        assert len(rows) == 3
        assert all((t["attrs"]["data-t"] == "") == (step == 2) for r in rows for t in r["tokens"])
    assert report(copy, "--steps", "99").returncode == 2  # nothing to show


# ---------------------------------------------------------------- in a real browser


def browse(chromium: Path, page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", *args, f"file://{page}"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_chromium_renders_it(chromium: Path, page: Path, tmp_path: Path) -> None:
    png = tmp_path / "samples.png"
    proc = browse(chromium, page, tmp_path, f"--screenshot={png}", "--window-size=1200,900")
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    from PIL import Image

    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 900)
    pixels = list(image.getdata())
    colours = set(pixels)
    non_white = sum(p != (255, 255, 255) for p in pixels)
    assert len(colours) > 200, f"only {len(colours)} colours: a blank page?"
    assert non_white > 0.03 * len(pixels), f"{non_white} non-white pixels: a blank page?"
    tinted = {p for p in colours if max(p) - min(p) > 40}  # the token backgrounds (the page itself is grey-scale)
    assert len(tinted) > 5, "no coloured tokens"

    # The DOM after the page's script ran: every token painted and given its hover title.
    dom = browse(chromium, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    spans = re.findall(r"<span class=\"t[^\"]*\"([^>]*)>", dom.stdout)
    assert spans and all('style="background' in s for s in spans)
    titles = [re.search(r'title="([^"]*)"', s, re.S).group(1) for s in spans]
    words = ("id ", "logprob ", "advantage ", "importance ratio ", "mismatch ")
    assert all(w in title for title in titles for w in words)
    values = [tuple(float(re.search(rf'data-{k}="([^"]*)"', s).group(1)) for k in ("l", "t")) for s in spans]
    k = max(range(len(spans)), key=lambda i: abs(values[i][1] - values[i][0]))  # where the trainer disagrees most
    (l, t), title = values[k], titles[k]
    assert abs(t - l) > 1e-3, "weights that trained steps 2 and 3 differ from the sampler's: some mismatch expected"
    token_id = re.search(r'data-i="(\d+)"', spans[k]).group(1)
    assert title.startswith(f"id {token_id} ")
    assert float(re.search(r"importance ratio (\S+)", title).group(1)) == pytest.approx(math.exp(t - l), rel=1e-4)
    assert float(re.search(r"mismatch (\S+)", title).group(1)) == pytest.approx(abs(t - l), rel=1e-4)
