"""Resuming a calibrated run: after every decoder layer, what the rest of the run needs is on disk in the run's
partial folder (output.atomic_dir with `resumable`), so that the same run started again after a crash or a kill
continues with the next layer and ends with the very checkpoint an uninterrupted run writes.

What is kept: each finished layer's checkpoint tensors (`layers/NNNNN.safetensors`), every calibration batch's
hidden states as the next layer will read them (`hidden-NNNNN/bNNNNN.safetensors`, NNNNN the next layer: one file
per batch, so that saving never copies more than one batch), and `resume.json` (the run's fingerprint, the next
layer, the finished layers' reports), written last and atomically; the older hidden states go after it. The
hidden states are written on a background thread while the next layer gathers its statistics and is quantized
(`wait` is called before anything changes them), so that saving them costs a run little of its time. A partial
folder whose fingerprint differs (another recipe, seed, calibration set, batch size, compute dtype, expert-token
threshold, ptqlab version, number of ranks, the model folder's files as the file system describes them) is
discarded, never resumed; so is one whose files are damaged (each file's safetensors header and size are checked
before any is trusted), with a note saying which.

Several ranks (engine/distributed.py): each keeps its own batches' hidden states (`rR-bNNNNN`) in the one partial
folder (so --out must be on a filesystem every rank sees) and marks them done (`rR.done`); rank 0 keeps the layers
and writes `resume.json` once every rank's are on disk; every rank resumes from it.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from ptqlab.engine.capture import Batch
from ptqlab.engine.calibrate import LayerReport
from ptqlab.output import RESUME_NAME, atomic_file, write_atomically
from ptqlab.safetensors_files import header_tensors

HIDDEN_PREFIX = "hidden-"
LAYERS_DIR = "layers"


def why_not_resumed(saved: dict, wanted: dict) -> str:
    """What differs between a partial run's fingerprint and this run's, for people."""
    if saved.get("resume.json") == "damaged":
        return "its resume.json is damaged"
    keys = [key for key in {**saved, **wanted} if saved.get(key) != wanted.get(key)]
    named = {"weights": "the model's files changed since (size or modification time)"}
    return "; ".join(named.get(key, key) for key in keys)


class Checkpointer:
    """The resume state of one run in its partial folder (of rank `rank` of `ranks`)."""

    RANKS_TIMEOUT_S = 3600.0
    """How long rank 0 waits for the other ranks' hidden states of a layer before the run fails."""

    def __init__(self, folder: Path, fingerprint: dict, rank: int = 0, ranks: int = 1):
        self.folder, self.fingerprint = Path(folder), json.loads(json.dumps(fingerprint, default=str))
        self.rank, self.ranks = rank, ranks
        self._saving = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptqlab-resume")
        self._pending: Future | None = None
        self.start_layer, self.reports, self.note = 0, [], None
        state_file = self.folder / RESUME_NAME
        state = None
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                state = None
            if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict):
                state = {"fingerprint": {"resume.json": "damaged"}}  # set aside below, with a note
        damage = None
        if state is not None and state.get("fingerprint") == self.fingerprint:
            damage = self._damage(int(state["next_layer"]))
            if damage is not None:
                state = {"fingerprint": {"damaged": damage}}
        if state is not None and state.get("fingerprint") == self.fingerprint:
            self.start_layer = int(state["next_layer"])
            self.reports = [LayerReport(**r) for r in state["reports"]]
            self.note = f"resumed from layer {self.start_layer}: layers 0-{self.start_layer - 1} were done by an earlier run"
            if rank == 0:  # hidden states the stopped run had begun for later layers: rewritten from here
                for later in self.folder.glob(f"{HIDDEN_PREFIX}*"):
                    if later.name > self._hidden_dir(self.start_layer).name:
                        shutil.rmtree(later, ignore_errors=True)
        elif rank > 0:  # rank 0 clears what is stale; the others start from layer 0 with it
            state = None
        else:
            stale = [p for p in self.folder.iterdir() if not p.name.startswith(".")]
            if damage is not None:
                self.note = f"resume state damaged ({damage}): set aside, started over from layer 0"
            elif state is not None:
                self.note = ("discarded an unfinished run of other settings in this --out's partial folder "
                             f"({why_not_resumed(state['fingerprint'], self.fingerprint)}): started over")
            for path in stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if rank == 0:
            (self.folder / LAYERS_DIR).mkdir(exist_ok=True)

    def _damage(self, next_layer: int) -> str | None:
        """What is wrong with the kept state of a run that stopped before `next_layer` (a file cut short by a full
        disk or a kill mid-write, a file gone), or None: checked from the files' headers and sizes before any is
        trusted, so a damaged state is set aside once instead of failing every retry."""
        hidden = sorted(self._hidden_dir(next_layer).glob("*.safetensors"))
        if not hidden:
            return f"layer {next_layer}'s input hidden states are missing"
        layers = [self.layer_file(i) for i in range(next_layer)]  # rank 0's, checked by every rank: one verdict
        for file in layers + hidden:
            try:
                header_tensors(file)
            except (OSError, ValueError) as e:
                return f"{file.relative_to(self.folder)}: {getattr(e, 'strerror', None) or e}"
        return None

    def _batch_file(self, folder: Path, i: int) -> Path:
        return folder / (f"b{i:05d}.safetensors" if self.ranks == 1 else f"r{self.rank}-b{i:05d}.safetensors")

    def layer_file(self, index: int) -> Path:
        return self.folder / LAYERS_DIR / f"{index:05d}.safetensors"

    def write_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        with atomic_file(self.layer_file(index)) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})

    def restore(self, batches: list[Batch]) -> None:
        """Give every batch the hidden states the next layer reads (saved after the last finished layer)."""
        from safetensors.torch import load_file

        if self.start_layer == 0:
            return
        folder = self._hidden_dir(self.start_layer)
        for i, batch in enumerate(batches):  # in place: the batch's buffer keeps its device (and pinning)
            saved = load_file(self._batch_file(folder, i))
            batch.hidden.copy_(saved["hidden"])
            if "float_hidden" in saved:  # AutoRound's targets' inputs (engine/autoround.py)
                batch.float_hidden = saved["float_hidden"].to(batch.hidden.device)

    def save(self, index: int, batches: list[Batch], reports: list[LayerReport]) -> None:
        """After layer `index` is finished and written: start writing the next layer's inputs, then the state that
        points at them, in the background. The batches' hidden states must stay as they are until `wait`."""
        self.wait()
        hidden = [{"hidden": batch.hidden} | ({} if batch.float_hidden is None else {"float_hidden": batch.float_hidden})
                  for batch in batches]
        state = {"fingerprint": self.fingerprint, "next_layer": index + 1, "reports": [asdict(r) for r in reports]}
        self._pending = self._saving.submit(self._write_state, index + 1, hidden, state)

    def wait(self) -> None:
        """Until the last `save` is on disk (its error, if any, raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_state(self, next_layer: int, hidden: list[dict[str, torch.Tensor]], state: dict) -> None:
        from safetensors.torch import save_file

        folder = self._hidden_dir(next_layer)
        folder.mkdir(exist_ok=True)
        for i, tensors in enumerate(hidden):  # one batch at a time in CPU memory
            save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, self._batch_file(folder, i))
        if self.ranks > 1:
            (folder / f"r{self.rank}.done").write_text("")
            if self.rank > 0:
                return
            self._wait_for_ranks(folder)
        write_atomically(self.folder / RESUME_NAME, json.dumps(state))
        self._drop_hidden(keep=folder)

    def _wait_for_ranks(self, folder: Path) -> None:
        """Until every rank has marked its hidden states of `folder` written."""
        deadline = time.monotonic() + self.RANKS_TIMEOUT_S
        while not all((folder / f"r{r}.done").is_file() for r in range(self.ranks)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{folder}: the other ranks' hidden states did not arrive")
            time.sleep(0.05)

    def _hidden_dir(self, next_layer: int) -> Path:
        return self.folder / f"{HIDDEN_PREFIX}{next_layer:05d}"

    def _drop_hidden(self, keep: Path | None = None) -> None:
        """The hidden states before `keep` (all without it). Later ones stay: another rank may be writing them."""
        for folder in self.folder.glob(f"{HIDDEN_PREFIX}*"):
            if keep is None or folder.name < keep.name:
                shutil.rmtree(folder, ignore_errors=True)

    def finished_layers(self):
        """The checkpoint tensors of every finished layer, in layer order, read one file at a time."""
        from safetensors.torch import load_file

        for file in sorted((self.folder / LAYERS_DIR).glob("*.safetensors")):
            yield load_file(file)

    def clear(self) -> None:
        """The run is complete: its resume state goes (the checkpoint stays)."""
        self.wait()
        self._saving.shutdown()
        shutil.rmtree(self.folder / LAYERS_DIR, ignore_errors=True)
        self._drop_hidden()
        (self.folder / RESUME_NAME).unlink(missing_ok=True)

