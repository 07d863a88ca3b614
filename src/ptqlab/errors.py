"""The one exception type ptqlab raises for bad input: its message names the problem and the fix.

The CLI prints it as one line (no traceback) and exits with status 2.
"""


class PtqlabError(Exception):
    """A problem the user can fix; the message says how."""


class OutOfMemory(PtqlabError):
    """A GPU ran out of memory inside a run: where (the engine's phase, the decoder layer or None) and torch's own
    message. The engine raises it where it knows the phase; the run that knows its plan, what it kept and its flags
    (api.quantize) says the one line a person acts on."""

    def __init__(self, phase: str, layer: int | None, detail: str):
        self.phase, self.layer, self.detail = phase, layer, detail
        super().__init__(f"the GPU ran out of memory in {phase}{'' if layer is None else f' of layer {layer}'}: "
                         f"{detail.splitlines()[0] if detail else 'out of memory'}")
