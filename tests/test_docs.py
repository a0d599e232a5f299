"""Every Python code block of the documentation (docs/**/*.md and README.md) runs, offline, on tiny models.

The blocks of one page run in order in one shared namespace, which starts with these names (the pages say what they
stand for):

- `base`: a causal LM (a tiny Llama: vocabulary 128, hidden 64, 2 layers), `tokenizer`: its tokenizer;
- `model_path`: a directory holding that model and tokenizer (what `from_pretrained` takes);
- `loader_a`, `loader_b`: calibration loaders (lists of `{"input_ids", "attention_mask"}` batches);
- `batch`: a batch with `labels`, `micro_batches`: a list of such batches.

The working directory is a temporary directory next to `shared/data`, so `"../shared/data"` is the real task data.
The first Python block of README.md (and of docs/index.md, the same block) also runs on its own, in an empty
namespace: it is the example a new user copies, so it must define everything it uses.

A block is not run when its fence says `title="not run"` (```` ```python title="not run" ````) or the line before
it is `<!-- norun -->`; keep those rare (code that needs a GPU, the network or a large model). Bash blocks never run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)
NORUN_MARKER = "<!-- norun -->"
# Pages whose blocks do not follow the convention yet: remove a page once its blocks run or are marked.
NOT_YET_CHECKED: set[str] = set()
# Pages about several processes or GPUs: their marked blocks need a launcher (torchrun) or GPUs, each says why, and
# they are left out of the "non-runnable blocks are rare" count.
LAUNCHER_PAGES: set[str] = {"distributed.md"}


def code_blocks(text: str) -> list[tuple[int, str, bool]]:
    """The Python blocks of a Markdown text: `(line number, code, runnable)`, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        info = match.group("info").strip()
        language = info.split(" ", 1)[0].split("{", 1)[0].lower()
        if language not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        previous = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()
        runnable = 'title="not run"' not in info and previous != NORUN_MARKER
        indent = match.group("indent")
        body = "".join(
            row[len(indent) :] if row.startswith(indent) else row for row in match.group("body").splitlines(True)
        )
        blocks.append((line, body, runnable))
    return blocks


def test_code_blocks_are_found_and_markers_respected():
    text = (
        "x\n```python\na = 1\n```\n<!-- norun -->\n```python\nb = 2\n```\n"
        '```py title="not run"\nc = 3\n```\n```bash\nls\n```\n!!! note\n    ```python\n    d = 4\n    ```\n'
    )
    assert [(code, runnable) for _, code, runnable in code_blocks(text)] == [
        ("a = 1\n", True),
        ("b = 2\n", False),
        ("c = 3\n", False),
        ("d = 4\n", True),
    ]


def test_non_runnable_blocks_are_rare():
    counted = [p for p in PAGES if p.name not in NOT_YET_CHECKED | LAUNCHER_PAGES]
    blocks = [b for page in counted for b in code_blocks(page.read_text())]
    skipped = [b for b in blocks if not b[2]]
    assert len(blocks) >= 20 and len(skipped) <= max(3, len(blocks) // 8), (len(blocks), len(skipped))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs_model")
    make_tiny_llama(seed=0, max_position_embeddings=2048).save_pretrained(path)
    make_tiny_tokenizer(pad=True).save_pretrained(path)
    return path


def page_namespace(model_path: Path) -> dict:
    tokenizer = make_tiny_tokenizer(pad=True)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, return_tensors="pt", padding=True))

    batch = encode(["the movie was great. It was great", "a dull, slow film. It was terrible"])
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    return {
        "__name__": "__docs__",
        "base": make_tiny_llama(seed=0, max_position_embeddings=2048),
        "tokenizer": tokenizer,
        "model_path": str(model_path),
        "loader_a": [encode(["a fine film", "the plot was thin"]), encode(["great acting", "dull"])],
        "loader_b": [encode(["Is the sky blue?\nYes", "Can fish fly?\nNo"]), encode(["Is water wet?\nYes"])],
        "batch": batch,
        "micro_batches": [batch, {k: v.flip(0) for k, v in batch.items()}],
    }


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_code_blocks_run(page, model_path, tmp_path, monkeypatch):
    if page.name in NOT_YET_CHECKED:
        pytest.skip(f"{page.name}: written by another issue, blocks not checked yet")
    blocks = [(line, code) for line, code, runnable in code_blocks(page.read_text()) if runnable]
    if not blocks:
        pytest.skip("no runnable Python block")
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = page_namespace(model_path)
    for line, code in blocks:
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"{page.relative_to(ROOT)}, block at line {line} failed: {error!r}\n{code}"
            ) from error


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "index.md"], ids=["README.md", "index.md"])
def test_the_first_example_runs_on_its_own(page, tmp_path, monkeypatch):
    """No name from `page_namespace`: the block builds its model and data, trains a step, saves and reloads."""
    line, code, runnable = code_blocks(page.read_text())[0]
    assert runnable
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__example__"}
    exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
    reloaded, model = namespace["reloaded"], namespace["model"]
    assert list(reloaded.peft_config) == ["default"]  # one adapter, on a fresh base
    assert any(p.requires_grad for p in reloaded.parameters())  # loaded to train on
    assert reloaded.get_masks().keys() == model.get_masks().keys()
    assert all(reloaded.get_masks()[k].equal(m) for k, m in model.get_masks().items())


def test_readme_and_index_open_with_the_same_example():
    readme, index = (code_blocks(p.read_text())[0][1] for p in (ROOT / "README.md", ROOT / "docs" / "index.md"))
    assert readme == index


def shell_commands(text: str) -> list[str]:
    """The `mazo train` / `mazo eval` commands of a page's bash blocks, continuation lines joined."""
    commands = []
    for match in FENCE.finditer(text):
        if match.group("info").strip().split(" ", 1)[0].lower() not in ("bash", "sh", "console", "shell"):
            continue
        body = re.sub(r"\\\n\s*", " ", match.group("body"))
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip()
            found = re.match(r"^(?:[A-Z_]+=\S+\s+)*mazo (train|eval)( .*)?$", line)
            if found:
                commands.append(found.group(0)[found.group(0).index("mazo ") + 5 :])
    return commands


def test_every_documented_mazo_command_parses():
    """Each `mazo train` / `mazo eval` command in README.md and docs/ takes only flags the CLI has (placeholders such
    as `<model dir>` or `DIR` are values, so they parse too; commands with shell variables or `...` are left out): a renamed
    or removed flag fails here."""
    import shlex

    from peft_mazo.cli import _config, build_parser

    parser = build_parser()
    seen = 0
    for page in PAGES:
        for command in shell_commands(page.read_text()):
            if "$" in command or "..." in command:  # a shell variable, or an abbreviated command
                continue
            argv = shlex.split(command.replace("<", "").replace(">", ""))
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{page.relative_to(ROOT)}: `mazo {command}` does not parse")
            if args.command == "train":
                _config(args)  # the flags' values convert into a RunConfig
            seen += 1
    assert seen >= 3  # README's main job and its GPU variant at least
