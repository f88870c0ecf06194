"""The benchmarks' column schemas, their files, and the shuffled-image control.

Each benchmark file is one parquet file in exactly the columns and types of the release that
lmms-eval reads (Hugging Face `datasets` features, stored in the parquet schema's metadata so that
`load_dataset("parquet", ...)` gives images back as images):

    MMBench    lmms-lab/MMBench (en, dev)   circular copies at index + k * 1e6
    SEEDBench  lmms-lab/SEED-Bench (test)   image is a list of images
    MMStar     Lin-Chen/MMStar (val)        options inline in the question
    MathVista  AI4Math/MathVista (testmini) image path + decoded_image, metadata struct
    POPE       lmms-lab/POPE (test)         category: adversarial / popular / random

The control file of a benchmark has the same rows with every image moved to another question
(a derangement over images, so no question keeps its own picture and questions sharing an image,
such as MMBench's circular copies or POPE's six questions per image, move together).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, List, Value

from ..io import write_parquet
from . import BENCHMARKS

S = Value("string")

FEATURES: dict[str, Features] = {
    "MMBench": Features({
        "index": Value("int64"), "question": S, "hint": S, "answer": S,
        "A": S, "B": S, "C": S, "D": S, "category": S, "image": Image(), "source": S,
        "L2-category": S, "comment": S, "split": S,
    }),
    "SEEDBench": Features({
        "answer": S, "choice_a": S, "choice_b": S, "choice_c": S, "choice_d": S,
        "data_id": S, "data_type": S, "question": S, "question_id": S,
        "question_type_id": Value("int64"), "image": List(Image()),
    }),
    "MMStar": Features({
        "index": Value("int64"), "question": S, "image": Image(), "answer": S, "category": S,
        "l2_category": S, "meta_info": {"source": S, "split": S, "image_path": S},
    }),
    "MathVista": Features({
        "pid": S, "question": S, "image": S, "decoded_image": Image(), "choices": List(S),
        "unit": S, "precision": Value("float64"), "answer": S, "question_type": S,
        "answer_type": S,
        "metadata": {
            "category": S, "context": S, "grade": S, "img_height": Value("int64"),
            "img_width": Value("int64"), "language": S, "skills": List(S), "source": S,
            "split": S, "task": S,
        },
        "query": S,
    }),
    "POPE": Features({
        "id": S, "question_id": S, "question": S, "answer": S, "image_source": S,
        "image": Image(), "category": S,
    }),
}

IMAGE_COLUMN = {"MMBench": "image", "SEEDBench": "image", "MMStar": "image",
                "MathVista": "decoded_image", "POPE": "image"}

CIRCULAR_OFFSET = 1_000_000  # MMBench: copy k of question i has index i + k * 1e6


GROUP_COLUMN = {"MMBench": "index", "SEEDBench": "question_id", "MMStar": "index", "MathVista": "pid",
                "POPE": "image_source"}


def image_groups(benchmark: str, table: pa.Table) -> list:
    """Per row, the id of the picture it asks about (rows with equal ids share one image)."""
    ids = table.column(GROUP_COLUMN[benchmark]).to_pylist()
    return [i % CIRCULAR_OFFSET for i in ids] if benchmark == "MMBench" else ids


def read_image_groups(path, benchmark: str) -> list:
    """image_groups of a benchmark file, reading only the column it needs."""
    return image_groups(benchmark, pq.read_table(path, columns=[GROUP_COLUMN[benchmark]]))


def data_file(data_dir, benchmark: str, shuffled: bool = False) -> Path:
    if benchmark not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {benchmark!r}; known: {BENCHMARKS}")
    return Path(data_dir) / f"{benchmark}{'_shuffled' if shuffled else ''}.parquet"


def write_rows(rows: list[dict], benchmark: str, path) -> Path:
    """Write rows (images as {"bytes": ..., "path": ...} or PNG bytes) in the benchmark's schema."""
    table = Dataset.from_list(rows, features=FEATURES[benchmark]).data.table
    return write_table(table, path)


def write_table(table: pa.Table, path) -> Path:
    """Write atomically; the schema metadata (the features) travels with the table. pyarrow's
    dictionary encoding stores an image shared by several rows once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(table, path)
    return path


def questions_written(counts: dict[str, dict]) -> int:
    """The questions of a set of benchmark files, from their per-benchmark counts ({"rows": n,
    "control": {...}}): the rows of each file, not of its shuffled twin."""
    return sum(c["rows"] for c in counts.values())


class SchemaError(ValueError):
    """A benchmark file that is missing or not in its benchmark's schema."""


def check_schema(path, benchmark: str) -> None:
    """Raise SchemaError unless the file has exactly the benchmark's columns and types."""
    expected = FEATURES[benchmark]
    if not Path(path).is_file():
        raise SchemaError(f"{path}: {benchmark} file not found (rule eval_data writes it, or convert the release)")
    try:
        got = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{path}: not a parquet file ({e})") from None
    if got.names != list(expected):
        missing = [c for c in expected if c not in got.names]
        extra = [c for c in got.names if c not in expected]
        raise SchemaError(f"{path}: columns differ from {benchmark}'s: missing {missing}, unexpected {extra}"
                          + ("" if missing or extra else f", order {got.names}"))
    want = expected.arrow_schema
    for name in expected:
        if not got.field(name).type.equals(want.field(name).type):
            raise SchemaError(f"{path}: column {name} is {got.field(name).type}, "
                             f"{benchmark} has {want.field(name).type}")
    stored = Features.from_arrow_schema(got)
    if stored != expected:
        raise SchemaError(f"{path}: stored features differ from {benchmark}'s (images would not "
                         f"load as images)")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (Sattolo's algorithm: one cycle through all n)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))  # j < i: never leaves i in place
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _image_bytes(value) -> bytes:
    """The bytes of one image cell (or of an image list, joined) for equality checks."""
    if isinstance(value, list):
        return b"\0".join(_image_bytes(v) for v in value)
    return value["bytes"] or (value["path"] or "").encode()


def shuffle_images(src, dst, benchmark: str, seed: int) -> dict:
    """Write the control file: every image group gets another group's image, never its own (also
    not a byte-identical copy of it). Returns counts for the log."""
    table = pq.read_table(src)
    groups = image_groups(benchmark, table)
    order = list(dict.fromkeys(groups))  # groups in first-seen order
    first_row = {}
    for r, g in enumerate(groups):
        first_row.setdefault(g, r)
    col = IMAGE_COLUMN[benchmark]
    images = table.column(col)
    content = [_image_bytes(images[first_row[g]].as_py()) for g in order]
    rng = np.random.default_rng([seed, len(order), 7])
    perm = derangement(len(order), rng)
    # A group may have been given a picture identical to its own (two questions on equal images);
    # swap such targets with another group's until none is left.
    for _ in range(10 * len(order)):
        same = [i for i in range(len(order)) if content[perm[i]] == content[i]]
        if not same:
            break
        i = same[0]
        j = int(rng.integers(len(order)))
        if content[perm[j]] != content[i] and content[perm[i]] != content[j]:
            perm[i], perm[j] = perm[j], perm[i]
    else:
        raise ValueError(f"{src}: cannot shuffle images without keeping one in place "
                         f"(too few distinct images)")
    target = {g: first_row[order[perm[k]]] for k, g in enumerate(order)}
    take = pa.array([target[g] for g in groups], type=pa.int64())
    shuffled = table.set_column(table.schema.get_field_index(col), col, images.take(take))
    write_table(shuffled.replace_schema_metadata(table.schema.metadata), dst)
    return {"rows": table.num_rows, "images": len(order)}
