"""The run record, `ptqlab.json`: what every checkpoint ptqlab writes says about how it was made.

This module owns it: the file name, the fields (RunRecord), writing and reading. The record is also the mark of a
folder ptqlab wrote (--overwrite replaces only such a folder), the source a `bench` baseline is inferred from, and
the request `lab` compares before it reuses a checkpoint. A leaf: it imports nothing of ptqlab above it, so any
module may read records.
"""

from __future__ import annotations

import json
import platform
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from ptqlab.errors import PtqlabError
from ptqlab.version import __version__

RECORD_NAME = "ptqlab.json"
"""The run record's file name in a checkpoint folder."""


def versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers, for run records and results. The libraries are imported
    here, when asked, so that reading a record does not load torch."""
    import compressed_tensors
    import safetensors
    import torch
    import transformers

    return {
        "ptqlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "safetensors": safetensors.__version__,
    }


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One checkpoint's run record, field for field as `ptqlab.json` holds it: the keys are the field names, in this
    order. `layers` and `request` have defaults because records written before they existed lack them."""

    model: str | None
    """The model as the user named it (hub id or folder; None for the embedded default)."""
    model_path: str
    """The local folder the model was read from: where `bench` finds the 16-bit baseline of this checkpoint."""
    model_note: str | None
    """What to know about the source model (the embedded default's note), or None."""
    recipe: dict
    """The recipe as run, in its YAML form (Recipe.to_dict)."""
    format: str
    """compressed-tensors format: pack-quantized, int-quantized, float-quantized."""
    scheme: str
    """The scheme in words (Scheme.describe)."""
    settings: dict
    """The run's settings: dtype, compute dtype, seed, calibration, device, --out."""
    quantized_layers: int
    ignored_layers: tuple[str, ...]
    """The layers kept 16-bit."""
    notes: tuple[str, ...]
    """What the user should know about the run (calibration drawn, group size changed, upcast compute)."""
    layers: tuple[dict, ...] = ()
    """Per decoder layer: its index, seconds per step and what each transform chose."""
    seconds: float
    """Wall time of the run, loading included."""
    created: str
    """UTC time of writing, ISO 8601."""
    versions: dict
    """versions() at the time of the run."""
    command: tuple[str, ...]
    """sys.argv of the run."""
    request: dict | None = None
    """Everything the user asked for that determines the tensors (api.request_of); compared before reuse."""
    verification: tuple[dict, ...] = ()
    """Each reader that read the checkpoint back and matched the quantized model (formats/readback.py): reader,
    versions, relative logit error, KL, top-1 agreement."""

    @property
    def recipe_name(self) -> str:
        return self.recipe["name"]

    def request_differences(self, request: dict) -> list[str]:
        """The keys of `request` whose value this record's request differs in (all of them for a record without
        one): a checkpoint is reused only when this is empty."""
        recorded = self.request or {}
        return [key for key in request if recorded.get(key) != request[key]]

    def to_json(self) -> str:
        # default=str: settings and transform details may hold paths or numbers of other types; the record is for
        # reading, not for rebuilding those objects.
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, indent=2, default=str) + "\n"

    def write(self, folder: Path) -> Path:
        path = Path(folder) / RECORD_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        """Build from the parsed JSON; keys this version does not know are ignored (a newer ptqlab's record reads).
        Raises ValueError naming what is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        if not isinstance(data["recipe"], dict) or not isinstance(data["recipe"].get("name"), str):
            raise ValueError("its recipe has no name")
        values = {key: value for key, value in data.items() if key in known}
        for key in _TUPLES:
            if key in values:
                if not isinstance(values[key], list):
                    raise ValueError(f"{key} is not a list")
                values[key] = tuple(values[key])
        return cls(**values)


_TUPLES = ("ignored_layers", "notes", "layers", "command")
"""Fields held as tuples (the record is frozen); JSON holds them as lists."""


def has_record(folder: Path) -> bool:
    """Whether `folder` holds a run record: a folder ptqlab wrote."""
    return (Path(folder) / RECORD_NAME).is_file()


def read_record(folder: Path) -> RunRecord | None:
    """The run record of `folder`, None when it has none. A record that cannot be read (not JSON, a key missing)
    raises a PtqlabError of one line that names the file and what is wrong with it."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return RunRecord.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:  # json's JSONDecodeError is a ValueError
        reason = " ".join(str(e).split())
        raise PtqlabError(f"{path} is damaged ({reason}): it is not a run record ptqlab can read; quantize the model "
                          "again into this folder (--overwrite) or remove it") from None
