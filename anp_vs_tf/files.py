"""Writing result files so that a reader (or a killed run) never sees half a file.

Every file the package writes for others to read (config.json, metrics.json, tables,
figures, caches, best.cfg) goes through `atomic_write`: the content is written to a
temporary file in the same folder, which is then renamed over the target; a rename
within one file system is atomic, so the target holds either the old content or the
new, never part of it.
"""

import json
import os


def atomic_write(path, write):
    """Call `write(tmp)` to write a temporary file, then rename it to `path`.

    The temporary file keeps `path`'s extension (matplotlib and numpy pick the format
    from it) and is removed if `write` fails; the folder is created if needed.
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp{os.path.splitext(name)[1]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """`text` into `path`, atomically (newlines as given)."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, payload):
    """`payload` as indented JSON, atomically; keys keep their order (layers stay in network order)."""
    write_text(path, json.dumps(payload, indent=2))
