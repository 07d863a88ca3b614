"""Bad input a user can fix gets one line naming the problem and the fix, before any slow work, and no output.

Each case runs `ptqlab quantize` through the CLI and asserts: exit status 2, exactly one non-empty output line, it
starts with "error:", it holds the case's key phrase, no traceback, no --out folder. Before: what ptqlab did before
these checks (tracebacks are named by their exception).

| case                      | input                                                       | expected (key phrase)                                  | before                                                        |
|---------------------------|-------------------------------------------------------------|--------------------------------------------------------|---------------------------------------------------------------|
| truncated-safetensors     | model.safetensors with its last 100 bytes cut               | FILE: not a complete safetensors file                  | SafetensorError traceback (incomplete metadata)               |
| garbage-safetensors       | model.safetensors replaced by random bytes                  | FILE: not a complete safetensors file                  | SafetensorError traceback (header too large)                  |
| empty-safetensors         | model.safetensors of 0 bytes                                | FILE: not a complete safetensors file                  | SafetensorError traceback (header too small)                  |
| already-quantized         | the output of `quantize --recipe w8a8-rtn`                  | is already quantized (compressed-tensors) ... 16-bit   | TypeError traceback in torch.finfo (GPTQ: RuntimeError dtype) |
| bad-ignore-regex          | --ignore 're:(['                                            | 're:([' is not a valid regular expression (...)        | re.error traceback                                            |
| calib-batch-size-0 / -1   | --calib-batch-size 0, -1 (GPTQ recipe)                      | --calib-batch-size 0: must be at least 1               | 0: ran and wrote a checkpoint (taken as 1)                    |
| num-samples-0             | --num-samples 0                                             | --num-samples 0: must be at least 1                    | one line naming both --num-samples and --max-seq-len          |
| max-seq-len-0 / -5        | --max-seq-len 0, -5                                         | --max-seq-len 0: must be at least 2                    | one line naming both --num-samples and --max-seq-len          |
| messages-not-list         | .jsonl line {"messages": "hello"}                           | FILE:2: 'messages' must be a list of {role, content}   | skipped: "only N usable samples", after loading the model     |
| message-not-object        | {"messages": ["hi"]}                                        | FILE:2: ... message 1 is a string                      | skipped: "only N usable samples", after loading the model     |
| message-content-number    | {"messages": [{"role": "user", "content": 5}]}              | FILE:2: ... message 1's 'content' is a number          | skipped: "only N usable samples", after loading the model     |
| message-without-content   | {"messages": [{"role": "user"}]}                            | FILE:2: ... message 1 has no 'content'                 | skipped: "only N usable samples", after loading the model     |
| text-number / list / null | {"text": 5}, {"text": ["a"]}, {"text": null}                | FILE:2: 'text' must be a string, got a number          | AttributeError traceback ('int' has no 'strip'); null: no line|
| line-not-object           | a .jsonl line [1, 2] / "hello"                              | FILE:2: expected an object with 'messages' or 'text'   | AttributeError traceback ('list' has no 'get')                |
| jsonl-not-utf8 / txt-...  | byte 0xe9 in a .jsonl / .txt                                | FILE:1: not UTF-8 text (byte 0xe9)                     | UnicodeDecodeError traceback                                  |
| parquet-not-parquet       | text in a file named .parquet                               | FILE: not a readable Parquet file                      | ArrowInvalid traceback                                        |
| parquet-no-column         | a Parquet table with only a 'prompt' column                 | FILE: no 'messages' or 'text' column                   | one line without the file, after loading the model            |
| parquet-text-number       | a Parquet 'text' column of numbers                          | FILE: row 1: 'text' must be a string                   | AttributeError traceback                                      |
| empty-jsonl / txt         | a 0-byte .jsonl / .txt                                      | FILE: the file is empty; expected ...                  | "only 0 usable samples", after loading the model              |
| empty-parquet             | a 0-byte .parquet                                           | FILE: the file is empty                                | ArrowInvalid traceback                                        |
| blank-jsonl               | a .jsonl of blank lines                                     | FILE: no calibration samples in it                     | "only 0 usable samples", after loading the model              |
| too-few-records           | 1 record, --num-samples 4                                   | only 1 calibration records in file                     | the same, after loading the model                             |
| dataset-folder            | --dataset an empty folder                                   | is a folder with no data files in it                   | one line from datasets, after loading the model               |
| dataset-folder-jsonl      | --dataset a folder named x.jsonl                            | is a folder: give a .jsonl file                        | "does not exist"                                              |
| group-size-48             | --group-size 48, every width a multiple of 256              | use --group-size 32                                    | "use --group-size 1"                                          |
| no-weights                | a folder with config.json only                              | has a config.json but no weights                       | one line from transformers (no file named ...)                |
| config-not-json           | config.json "{not json"                                     | config.json: not valid JSON                            | one line from transformers                                    |
| config-not-object         | config.json "[1]"                                           | config.json: expected a JSON object                    | TypeError traceback                                           |
| config-not-utf8           | config.json with a 0xe9 byte                                | config.json: not UTF-8 text                            | one line: "not a valid JSON file"                             |
| unknown-model-type        | config.json {"model_type": "frobnicator"}                   | has model type 'frobnicator', which transformers       | one long line from transformers                               |
| config-bad-value          | config.json hidden_size "big"                               | cannot read the config ... 'hidden_size'               | StrictDataclassFieldValidationError traceback                 |
| config-other-shapes       | config.json hidden_size 128 for 256-wide weights            | do not match its config.json                           | RuntimeError traceback (ignore_mismatched_sizes)              |
| config-more-layers        | config.json num_hidden_layers 3 for 2 layers of weights     | lack 9 tensors its config.json describes               | ran: layer 2 randomly initialized, checkpoint written         |
| index-missing-shard       | model.safetensors.index.json naming an absent shard         | lacks 1 of the 1 weight files                          | one line: No such file or directory (the shard)               |
| index-not-an-index        | model.safetensors.index.json without 'metadata'             | not a weight index                                     | KeyError 'metadata' traceback                                 |
| group-size-0              | --group-size 0                                              | --group-size 0: must be a positive integer             | ValueError traceback from schemes.QuantArgs                   |
| regex-with-brackets       | --ignore 're:[a-z]+('                                       | the pattern verbatim                                   | re.error traceback; then rich markup ate "[a-z]"              |
"""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from ptqlab.cli import app
from tiny import CHATS, write_jsonl

CALIBRATE = ["--recipe", "w4a16", "--num-samples", "4", "--max-seq-len", "16", "--calib-batch-size", "2", "--device", "cpu"]


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory):
    """A w8a8-rtn checkpoint made by ptqlab from the tiny model."""
    out = tmp_path_factory.mktemp("quantized") / "q"
    code, output = run("quantize", tiny_model_dir("llama"), "--recipe", "w8a8-rtn", "--out", out, "--quiet")
    assert code == 0, output
    return out


class Inputs:
    """What a case builds its arguments from: a private copy of the model on demand, files in tmp_path."""

    def __init__(self, tmp_path, model, calibration_file, quantized_dir):
        self.tmp, self.model, self.calibration, self.quantized = tmp_path, model, calibration_file, quantized_dir

    def model_copy(self, edit_config=None):
        folder = self.tmp / "model"
        shutil.copytree(self.model, folder)
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    def config_only(self, text: str | bytes):
        folder = self.tmp / "config-only"
        folder.mkdir()
        write = (folder / "config.json").write_bytes if isinstance(text, bytes) else (folder / "config.json").write_text
        write(text)
        return folder

    def calibrate_on(self, name: str, content: str | bytes | None = None, *, after_good_line: bool = True):
        """quantize arguments calibrating on a file `name` (content after one good line, or as is)."""
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text((json.dumps(CHATS[0]) + "\n" if after_good_line else "") + content)
        return [self.model, *CALIBRATE, "--dataset", path]


def _weights(edit):
    def build(i: Inputs):
        folder = i.model_copy()
        edit(folder / "model.safetensors")
        return [folder, "--recipe", "w8a8-rtn"]
    return build


def _config(edit):
    return lambda i: [i.model_copy(edit), "--recipe", "w8a8-rtn"]


def _jsonl_line(line: str):
    return lambda i: i.calibrate_on("chats.jsonl", line + "\n")


def _parquet(columns: dict):
    def build(i: Inputs):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), i.tmp / "data.parquet")
        return i.calibrate_on("data.parquet")
    return build


def _index(content: dict):
    def build(i: Inputs):
        folder = i.model_copy()
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(content))
        return [folder, "--recipe", "w8a8-rtn"]
    return build


def _folder(name: str):
    def build(i: Inputs):
        (i.tmp / name).mkdir()
        return i.calibrate_on(name)
    return build


def _set(**values):
    return lambda config: config.update(values)


def case(name: str, build, phrase: str, xfail: str | None = None):
    return pytest.param(build, phrase, id=name, marks=[pytest.mark.xfail(strict=True, reason=xfail)] if xfail else [])


def _calibrated(*extra):
    """A calibrated run on the good calibration file, with `extra` options (a repeated option: the last one wins)."""
    return lambda i: [i.model, *CALIBRATE, "--dataset", i.calibration, *extra]


MESSAGES = "'messages' must be a list of {role, content} objects with string values"

CASES = [
    # 1. damaged weights
    case("truncated-safetensors", _weights(lambda f: f.write_bytes(f.read_bytes()[:-100])), "model.safetensors: not a complete safetensors file"),
    case("garbage-safetensors", _weights(lambda f: f.write_bytes(os.urandom(4096))), "model.safetensors: not a complete safetensors file"),
    case("empty-safetensors", _weights(lambda f: f.write_bytes(b"")), "model.safetensors: not a complete safetensors file"),
    # 2. an already quantized checkpoint
    case("already-quantized", lambda i: [i.quantized, "--recipe", "w8a8-rtn"], "is already quantized (compressed-tensors)"),
    case("already-quantized-gptq", lambda i: [i.quantized, *CALIBRATE, "--dataset", i.calibration], "give the 16-bit original"),
    # 3. an invalid --ignore regex
    case("bad-ignore-regex", lambda i: [i.model, "--recipe", "w8a8-rtn", "--ignore", "re:(["],
         "'re:([' is not a valid regular expression (unterminated character set at position 1)"),
    # 4. sizes
    case("calib-batch-size-0", _calibrated("--calib-batch-size", "0"), "--calib-batch-size 0: must be at least 1"),
    case("calib-batch-size-negative", _calibrated("--calib-batch-size", "-1"), "--calib-batch-size -1: must be at least 1"),
    case("num-samples-0", _calibrated("--num-samples", "0"), "--num-samples 0: must be at least 1"),
    case("max-seq-len-0", _calibrated("--max-seq-len", "0"), "--max-seq-len 0: must be at least 2"),
    case("max-seq-len-negative", _calibrated("--max-seq-len", "-5"), "--max-seq-len -5: must be at least 2"),
    # 5. calibration files
    case("messages-not-list", _jsonl_line('{"messages": "hello"}'), f"chats.jsonl:2: {MESSAGES}, got a string"),
    case("message-not-object", _jsonl_line('{"messages": ["hi"]}'), f"chats.jsonl:2: {MESSAGES}; message 1 is a string"),
    case("message-content-number", _jsonl_line('{"messages": [{"role": "user", "content": 5}]}'),
         f"chats.jsonl:2: {MESSAGES}; message 1's 'content' is a number"),
    case("message-without-content", _jsonl_line('{"messages": [{"role": "user"}]}'), f"chats.jsonl:2: {MESSAGES}; message 1 has no 'content'"),
    case("text-number", _jsonl_line('{"text": 5}'), "chats.jsonl:2: 'text' must be a string, got a number"),
    case("text-list", _jsonl_line('{"text": ["a"]}'), "chats.jsonl:2: 'text' must be a string, got a list"),
    case("text-null", _jsonl_line('{"text": null}'), "chats.jsonl:2: 'text' must be a string, got null"),
    case("line-a-list", _jsonl_line("[1, 2]"), "chats.jsonl:2: expected an object with 'messages' or 'text', got a list"),
    case("line-a-string", _jsonl_line('"hello"'), "chats.jsonl:2: expected an object with 'messages' or 'text', got a string"),
    case("jsonl-not-utf8", lambda i: i.calibrate_on("chats.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), "chats.jsonl:2: not UTF-8 text (byte 0xe9)"),
    case("txt-not-utf8", lambda i: i.calibrate_on("notes.txt", b"fine\n\ncaf\xe9 au lait\n"), "notes.txt:3: not UTF-8 text (byte 0xe9)"),
    case("parquet-not-parquet", lambda i: i.calibrate_on("data.parquet", b"not parquet at all"), "data.parquet: not a readable Parquet file"),
    case("parquet-no-column", _parquet({"prompt": ["a", "b"]}), "data.parquet: no 'messages' or 'text' column (columns: prompt)"),
    case("parquet-text-number", _parquet({"text": [1, 2]}), "data.parquet: row 1: 'text' must be a string, got a number"),
    case("empty-jsonl", lambda i: i.calibrate_on("chats.jsonl", b""), "chats.jsonl: the file is empty; expected one JSON object per line"),
    case("empty-txt", lambda i: i.calibrate_on("notes.txt", b""), "notes.txt: the file is empty; expected plain-text samples"),
    case("empty-parquet", lambda i: i.calibrate_on("data.parquet", b""), "data.parquet: the file is empty"),
    case("blank-jsonl", lambda i: i.calibrate_on("chats.jsonl", b"\n  \n\n"), "chats.jsonl: no calibration samples in it"),
    case("too-few-records", lambda i: i.calibrate_on("chats.jsonl", ""), "only 1 calibration records in file"),
    case("dataset-folder", _folder("data"), "is a folder with no data files in it"),
    case("dataset-folder-named-jsonl", _folder("data.jsonl"), "data.jsonl is a folder: give a .jsonl file"),
    # 6. a group size that does not divide (every width here is a multiple of 256)
    case("group-size-48", lambda i: [i.model, "--recipe", "w4a16-rtn", "--group-size", "48"],
         "the largest power of two up to 48 that divides every layer's input width is 32: use --group-size 32"),
    # 7. model folders
    case("no-weights", lambda i: [i.config_only(json.dumps({"model_type": "llama"})), "--recipe", "w8a8-rtn"], "has a config.json but no weights"),
    case("config-not-json", lambda i: [i.config_only("{not json"), "--recipe", "w8a8-rtn"], "config.json: not valid JSON"),
    case("config-not-object", lambda i: [i.config_only("[1]"), "--recipe", "w8a8-rtn"], "config.json: expected a JSON object of model settings, got a list"),
    case("config-not-utf8", lambda i: [i.config_only(b'{"model_type": "ll\xe9"}'), "--recipe", "w8a8-rtn"], "config.json: not UTF-8 text"),
    case("unknown-model-type", lambda i: [i.config_only('{"model_type": "frobnicator"}'), "--recipe", "w8a8-rtn"],
         "has model type 'frobnicator', which transformers"),
    case("config-bad-value", _config(_set(hidden_size="big")), "cannot read the config in"),
    case("config-other-shapes", _config(_set(hidden_size=128)), "do not match its config.json"),
    case("config-more-layers", _config(_set(num_hidden_layers=3)), "lack 9 tensors its config.json describes"),
    case("index-missing-shard", _index({"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}),
         "lacks 1 of the 1 weight files that model.safetensors.index.json lists"),
    case("index-not-an-index", _index({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}), "not a weight index"),
    case("group-size-0", lambda i: [i.model, "--recipe", "w4a16-rtn", "--group-size", "0"], "--group-size 0: must be a positive"),
    case("regex-with-brackets", lambda i: [i.model, "--recipe", "w8a8-rtn", "--ignore", "re:[a-z]+("], "'re:[a-z]+('"),
]


@pytest.mark.parametrize("build,phrase", CASES)
def test_bad_input_gets_one_line_and_no_output(build, phrase, tiny_model_dir, calibration_file, quantized_dir, tmp_path):
    inputs = Inputs(tmp_path, tiny_model_dir("llama"), calibration_file, quantized_dir)
    out = tmp_path / "out"
    code, output = run("quantize", *build(inputs), "--out", out, "--quiet")
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert phrase in lines[0], output
    assert "Traceback" not in output
    assert not out.exists()


def test_the_checks_come_before_the_model_is_loaded(tiny_model_dir, calibration_file, tmp_path, monkeypatch):
    """Sizes and calibration files are refused without loading anything."""
    import ptqlab.api

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ptqlab.api, "load_checked", no_loading)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": 5}])
    (tmp_path / "empty").mkdir()
    for args in (["--num-samples", "0", "--dataset", calibration_file], ["--max-seq-len", "1", "--dataset", calibration_file],
                 ["--dataset", bad], ["--dataset", tmp_path / "empty"]):
        code, output = run("quantize", tiny_model_dir("llama"), *CALIBRATE, *args, "--out", tmp_path / "q")
        assert code == 2 and output.startswith("error:"), output
