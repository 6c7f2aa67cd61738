"""Text for the char LM: the embedded corpus, a user's file, a character tokenizer, a seeded split.

The embedded corpus needs no network and copies no prose into the repository: it is the
docstrings of this Python installation's standard library, read from its source files at run
time (parsed with `ast`, never imported), in a fixed order: modules sorted by name, each file's
docstrings in source order. It differs between Python versions, so its size, the Python version
and a checksum are recorded in every run's data.json.

    text, info = read_source(TextDataConfig())                    # the embedded corpus
    split = split_text(text, TextDataConfig(), info)              # seeded train/validation
    tok = split.tokenizer; tok.decode(tok.encode("def f():"))     # 'def f():'
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import sys
import sysconfig
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stability.config import ConfigError, TextDataConfig

# Standard-library folders that hold test code and its data files, not documentation.
SKIP_PARTS = {"test", "tests", "idle_test"}


def stdlib_files() -> Iterator[Path]:
    """The public standard-library modules' source files, sorted by module name, then path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_PARTS:
            continue
        single, package = root / f"{name}.py", root / name
        if single.is_file():
            yield single
        elif (package / "__init__.py").is_file():
            for path in sorted(package.rglob("*.py")):
                if not SKIP_PARTS & set(path.relative_to(root).parts[:-1]):
                    yield path


def docstrings(source: str) -> Iterator[str]:
    """The docstrings of a module, its classes and functions, in source order (cleaned)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        tree = ast.parse(source)
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        stack.extend(reversed(list(ast.iter_child_nodes(node))))  # depth-first, source order


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_chars: int | None) -> tuple[str, int]:
    """(text, files read): docstrings joined by blank lines, stopping once `max_chars` are in."""
    parts: list[str] = []
    total = files = 0
    for path in stdlib_files():
        try:
            docs = list(docstrings(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a few data files in the stdlib are not Python 3
        files += 1
        for doc in docs:
            parts.append(doc)
            total += len(doc) + 2
        if max_chars is not None and total >= max_chars:
            break
    text = "\n\n".join(parts)
    return (text[:max_chars] if max_chars is not None else text), files


@functools.lru_cache(maxsize=4)
def _read_file(path: str, mtime_ns: int, size: int) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"data.path={path!r} is not allowed: expected a UTF-8 text file (byte {e.start} is not UTF-8: {e.reason})"
        ) from None
    except OSError as e:
        raise ConfigError(f"data.path={path!r} is not allowed: cannot read it ({e.strerror})") from None


def read_source(cfg: TextDataConfig) -> tuple[str, dict[str, Any]]:
    """The text `cfg` names and a description of it for data.json."""
    if cfg.path is None:
        text, files = stdlib_corpus(cfg.max_chars)
        info = {"source": "stdlib-docstrings", "python": platform.python_version(), "files": files}
    else:
        path = os.path.abspath(os.path.expanduser(cfg.path))
        if not os.path.isfile(path):
            what = "is a folder" if os.path.isdir(path) else "does not exist"
            raise ConfigError(f"data.path={cfg.path!r} is not allowed: expected a UTF-8 text file ({path} {what})")
        st = os.stat(path)
        text = _read_file(path, st.st_mtime_ns, st.st_size)
        if cfg.max_chars is not None:
            text = text[: cfg.max_chars]
        info = {"source": "file", "path": path}
        problem = unusable_text(text)
        if problem:
            cut = (
                f" (its first data.max_chars={cfg.max_chars}, what the model would see)"
                if cfg.max_chars is not None and st.st_size > cfg.max_chars
                else ""
            )
            raise ConfigError(f"data.path={cfg.path!r} is not allowed: the text{cut} {problem}; nothing to learn")
    info.update(chars=len(text), sha256=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])
    return text, info


# Text the char LM cannot learn from, checked on the decoded characters the model is fed.
MIN_VOCAB = 2  # one distinct character: the loss is 0 from the first step
MAX_CONTROL_SHARE = 0.1  # a binary file that happens to decode (NUL bytes are valid UTF-8)
MAX_DOMINANT_SHARE = 0.9  # one character this common: the target itself looks like a scream


def unusable_text(text: str) -> str | None:
    """Why decoded text cannot train a character LM, or None."""
    counts = Counter(text)
    if not counts:
        return "is empty"
    common, n = max(counts.items(), key=lambda kv: kv[1])
    if len(counts) < MIN_VOCAB:
        return f"has a vocabulary of 1 character ({common!r} x {n})"
    control = sum(k for c, k in counts.items() if not (c.isprintable() or c.isspace()))
    if control > MAX_CONTROL_SHARE * len(text):
        return (
            f"is not text: {control / len(text):.0%} of its characters are control characters "
            f"(the most common: {common!r})"
        )
    if all(c.isspace() for c in counts):
        return f"holds only whitespace ({len(counts)} distinct whitespace characters)"
    if n > MAX_DOMINANT_SHARE * len(text):
        return f"is {n / len(text):.0%} one character ({common!r}): a vocabulary too small to learn anything"
    return None


class CharTokenizer:
    """One id per distinct character of the text, in code-point order (nanoGPT's shakespeare_char)."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; KeyError for a character not in the vocabulary."""
        return [self.index[c] for c in text]

    def decode(self, ids: Any) -> str:
        """The text of token ids `ids`."""
        return "".join(self.chars[i] for i in ids)


@dataclass
class TextSplit:
    """Character ids of the training and validation text, and the tokenizer."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    tokenizer: CharTokenizer
    info: dict[str, Any] = field(default_factory=dict)


def split_text(text: str, cfg: TextDataConfig, info: dict[str, Any] | None = None) -> TextSplit:
    """Cut the text into chunks of `chunk_chars`; a seeded draw holds out `val_fraction` of them
    (at least one) for validation; each side keeps its chunks in their original order."""
    chunks = [text[i : i + cfg.chunk_chars] for i in range(0, len(text), cfg.chunk_chars)]
    n_val = max(1, round(cfg.val_fraction * len(chunks)))
    if len(chunks) - n_val < 1:
        raise ConfigError(_too_short(cfg, len(text), f"at least 2 chunks of data.chunk_chars={cfg.chunk_chars}"))
    g = torch.Generator().manual_seed(cfg.seed)
    held_out = set(torch.randperm(len(chunks), generator=g)[:n_val].tolist())
    tok = CharTokenizer(text)
    train = "".join(c for i, c in enumerate(chunks) if i not in held_out)
    val = "".join(c for i, c in enumerate(chunks) if i in held_out)
    info = dict(
        info or {}, vocab=len(tok), train_chars=len(train), val_chars=len(val), val_chunks=sorted(held_out)[:32]
    )
    return TextSplit(
        torch.tensor(tok.encode(train), dtype=torch.long), torch.tensor(tok.encode(val), dtype=torch.long), tok, info
    )


def check_sizes(split: TextSplit, cfg: TextDataConfig, context: int, batch_size: int, need_val: int) -> None:
    """Enough training windows for one batch and enough validation text for the scream prompts."""
    windows = (len(split.train) - 1) // context
    if windows < batch_size:
        raise ConfigError(
            _too_short(
                cfg,
                split.info.get("chars", 0),
                f"training text for train.batch_size={batch_size} windows of "
                f"model.context={context} characters; it has {windows}",
            )
        )
    if len(split.val) < need_val:
        raise ConfigError(
            _too_short(
                cfg,
                split.info.get("chars", 0),
                f"{need_val} characters of validation text (a window of model.context and the "
                f"scream check's prompt + generation); the split left {len(split.val)}",
            )
        )


def _too_short(cfg: TextDataConfig, chars: int, need: str) -> str:
    what = f"data.path={cfg.path!r}" if cfg.path is not None else f"data.max_chars={cfg.max_chars!r}"
    return f"{what} is too short: {chars} characters; need {need}"
