"""Weight files are verified before a net is built from them (issue "Reliability", item 4).

The format of save_pretrained (l2l_fast/pretrained/__init__.py has the spec): a torch file
{"format": "l2l_fast.pretrained.v2", "sha256": hex digest of body, "body": bytes of torch.save(payload)}, the
payload {"net_kwargs", "state_dict", "record", "saved_with"} (or {"groups": {name: {"net_kwargs",
"state_dict"}}, ...}). The files here are written by hand in the three layouts a loader meets: that format,
the untagged dict of before ("unverified": loads with a warning) and a meta-training run's best.pt.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

import l2l_fast.pretrained as pretrained
from l2l_fast import CoordinatewiseLSTM
from l2l_fast.files import save_atomic
from l2l_fast.grouped import GroupedLSTM, ParamGroup
from l2l_fast.pretrained import SHIPPED_DIR, load_pretrained, save_pretrained

PRETRAINED_FORMAT = "l2l_fast.pretrained.v2"
LAYOUTS = ["verified", "unverified", "run"]
# sha256 over (name, float32 bytes) of each weight in sorted name order, taken from the files as first
# shipped (commits 6d8c38d and before): re-saving them in the verified format must not change a bit.
SHIPPED_WEIGHTS_SHA256 = {
    "mnist": "e85c811080fb39822d5906375cd5e16e6d675143bbb8402be06a0c2c54a0ddf2",
    "quadratic": "39554a1644aacf75b7e642257cac76ba638d825ceffd70f6055c6959f8fa47c5",
}


def weights_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().contiguous(), b.detach().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def small_net(seed: int = 0, **kwargs) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(hidden_size=4, **kwargs)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write(path: Path, layout: str, kwargs: dict, state: dict, record: dict | None = None) -> Path:
    """A file of one net in `layout`, contents as given (nothing checked): what a loader may meet."""
    if layout == "unverified":
        torch.save({"net_kwargs": kwargs, "state_dict": state, "record": record or {}}, path)
    elif layout == "verified":
        body = torch_bytes({"net_kwargs": kwargs, "state_dict": state, "record": record or {}})
        torch.save({"format": PRETRAINED_FORMAT, "sha256": hashlib.sha256(body).hexdigest(), "body": body}, path)
    else:
        save_atomic({"config": {"task": "quadratic"}, "net_kwargs": kwargs, "net": state, "score": 1.0, "epoch": 1},
                    path)
    return path


def write_net(path: Path, layout: str, net=None, *, kwargs=None, **replace) -> Path:
    """`net`'s file (a small one by default) in `layout`, with weights replaced by `replace` (name=tensor)."""
    net = net or small_net()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state.update({k.replace("__", "."): v for k, v in replace.items()})
    return write(path, layout, net.size_kwargs() if kwargs is None else kwargs, state, {"seed": 3})


def refusal(path: Path, layout: str, match: str, spec: str | None = None) -> str:
    """Loads `path`, expecting one ValueError that names the file and matches `match`; no warning on a refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=match) as info:
            load_pretrained(spec or str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


def flip_a_bit_in_the_weights(path: Path, net: CoordinatewiseLSTM, name: str = "lstm.weight_hh_l0") -> None:
    """Flips the lowest bit of a byte of weight `name` where its float32 bytes are stored in the file.

    A verified file holds its body as a pickled bytes object, which torch's pickle protocol 2 writes as the
    UTF-8 text of the bytes read as latin-1: the weight's bytes are found in that spelling, and the flipped
    byte is one that stays valid UTF-8 (ASCII or a continuation byte), so that only the checksum can tell."""
    data = bytearray(path.read_bytes())
    raw = net.state_dict()[name].detach().contiguous().numpy().tobytes()
    for stored in (raw, raw.decode("latin-1").encode("utf-8")):
        if data.count(stored) == 1:
            break
    else:
        raise AssertionError(f"the bytes of {name} are not stored once in {path}")
    start = data.find(stored)
    offset = next(i for i in range(len(stored) // 2, len(stored)) if stored[i] < 0xC0)
    data[start + offset] ^= 1
    path.write_bytes(bytes(data))


class RunsCode:
    """Unpickled without weights_only, opens (creates) `marker`: a stand-in for a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- the format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [5, None, b"mnist"], ids=["int", "None", "bytes"])
def test_a_spec_neither_name_nor_path_is_a_type_error(spec):
    """Regression: from_pretrained(5) was an AttributeError ('int' object has no attribute 'removeprefix')."""
    with pytest.raises(TypeError, match="pretrained: expected a shipped name"):
        CoordinatewiseLSTM.from_pretrained(spec)


def test_round_trip_keeps_the_weights_bit_for_bit_and_the_record(tmp_path):
    net = small_net(num_layers=3, preprocess_p=7.5, output_scale=0.25)
    record = {"command": "l2l-fast meta-train ...", "seed": 3, "config": {"hidden": (20,), "lr": 2e-4}}
    save_pretrained(net, tmp_path / "opt.pt", record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_pretrained(str(tmp_path / "opt.pt"))
    assert loaded.size_kwargs() == net.size_kwargs() and loaded.record == record
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert all(bit_equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    raw = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert raw["format"] == PRETRAINED_FORMAT and raw["sha256"] == hashlib.sha256(raw["body"]).hexdigest()
    payload = torch.load(io.BytesIO(raw["body"]), weights_only=True)
    assert payload["net_kwargs"] == net.size_kwargs() and payload["record"] == record
    assert payload["saved_with"]["torch"] == torch.__version__


def test_round_trip_of_one_net_per_parameter_group(tmp_path):
    groups, dim = [ParamGroup("conv", 0, 3), ParamGroup("fc", 3, 5)], 5
    net = GroupedLSTM({"conv": small_net(1), "fc": small_net(2)}, groups, dim)
    save_pretrained(net, tmp_path / "cifar.pt", {"seed": 1})
    loaded = load_pretrained(str(tmp_path / "cifar.pt"), groups=groups, dim=dim)
    assert isinstance(loaded, GroupedLSTM) and loaded.record == {"seed": 1}
    assert all(bit_equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("name", sorted(SHIPPED_WEIGHTS_SHA256))
def test_the_shipped_files_are_verified_and_unchanged(name):
    raw = torch.load(SHIPPED_DIR / f"{name}.pt", weights_only=True)
    assert raw["format"] == PRETRAINED_FORMAT and raw["sha256"] == hashlib.sha256(raw["body"]).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = CoordinatewiseLSTM.from_pretrained(name)
    assert weights_digest(net.state_dict()) == SHIPPED_WEIGHTS_SHA256[name]
    assert net.size_kwargs() == dict(hidden_size=20, num_layers=2, preprocess_p=10.0, output_scale=0.1,
                                     features=("paper",), output="linear")
    assert {"command", "epochs", "seed", "validation_score", "config"} <= set(net.record)


def test_a_flipped_bit_in_the_tensor_data_is_detected(tmp_path):
    """Pins: a bit flipped inside a weight's stored bytes loaded without a word (slightly different weights)."""
    net = small_net()
    save_pretrained(net, tmp_path / "opt.pt", {"seed": 3})
    flip_a_bit_in_the_weights(tmp_path / "opt.pt", net)
    refusal(tmp_path / "opt.pt", "verified", "checksum mismatch")


def test_a_flipped_bit_in_a_run_file_is_detected(tmp_path):
    net = small_net()
    write_net(tmp_path / "best.pt", "run", net)
    flip_a_bit_in_the_weights(tmp_path / "best.pt", net)
    refusal(tmp_path / "best.pt", "run", "checksum mismatch")


def test_an_old_unverified_file_loads_with_a_warning_and_resaves(tmp_path):
    """Files written before the checksum (no format tag) still load, after every other check, with a
    UserWarning that says how to re-save them; resave() writes the same weights and record, verified."""
    net = small_net()
    path = write_net(tmp_path / "old.pt", "unverified", net)
    with pytest.warns(UserWarning, match=r"unverified.*no checksum.*resave") as caught:
        loaded = load_pretrained(str(path))
    assert str(path) in str(caught[0].message)
    assert loaded.record == {"seed": 3}
    assert all(bit_equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    pretrained.resave(path)
    assert torch.load(path, weights_only=True)["format"] == PRETRAINED_FORMAT
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_pretrained(str(path))
    assert again.record == {"seed": 3} and all(bit_equal(again.state_dict()[k], v) for k, v in net.state_dict().items())


def test_an_old_grouped_file_resaves_without_its_task(tmp_path):
    part = {"net_kwargs": small_net().size_kwargs(), "state_dict": small_net().state_dict()}
    torch.save({"groups": {"conv": part, "fc": part}, "record": {"seed": 1}}, tmp_path / "cifar.pt")
    pretrained.resave(tmp_path / "cifar.pt", tmp_path / "new.pt")
    groups = [ParamGroup("conv", 0, 3), ParamGroup("fc", 3, 5)]
    loaded = load_pretrained(str(tmp_path / "new.pt"), groups=groups, dim=5)
    assert loaded.record == {"seed": 1} and bit_equal(loaded.nets["fc"].out.weight, part["state_dict"]["out.weight"])


# --- the contents, in every layout ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e39], ids=["nan", "inf", "-inf", "f64-1e39"])
def test_a_non_finite_weight_is_refused(tmp_path, layout, value):
    """Pins: NaN weights loaded silently (every update NaN). 1e39 is finite in float64, +Inf in the net's float32."""
    bias = small_net().out.bias.detach().to(torch.float64 if value == 1e39 else torch.float32).clone()
    bias[0] = value
    path = write_net(tmp_path / "opt.pt", layout, out__bias=bias)
    refusal(path, layout, r"weight 'out.bias' has 1 non-finite value")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_a_non_floating_weight_is_refused(tmp_path, layout, dtype):
    """Pins: int64 weights loaded silently (truncated to whole numbers: steps of -8.9 on the quadratic)."""
    weight = (small_net().lstm.weight_hh_l0.detach() * 10).to(dtype)
    path = write_net(tmp_path / "opt.pt", layout, lstm__weight_hh_l0=weight)
    refusal(path, layout, rf"weight 'lstm.weight_hh_l0' is {dtype}, not floating point")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_other_floating_weights_load_as_float32(tmp_path, dtype):
    net = small_net()
    state = {k: v.detach().to(dtype) for k, v in net.state_dict().items()}
    loaded = load_pretrained(str(write(tmp_path / "opt.pt", "verified", net.size_kwargs(), state)))
    assert all(torch.equal(loaded.state_dict()[k], v.float()) for k, v in state.items())


CONSTANTS = [
    ("output_scale", math.nan, "output_scale: expected a finite number"),
    ("output_scale", math.inf, "output_scale: expected a finite number"),
    ("output_scale", "0.1", "output_scale: expected a finite number"),
    ("preprocess_p", 0.0, r"preprocess_p: expected a finite number in \(0, 87\]"),
    ("preprocess_p", -1.0, r"preprocess_p: expected a finite number in \(0, 87\]"),
    ("preprocess_p", 88.0, r"preprocess_p: expected a finite number in \(0, 87\]"),
    ("preprocess_p", math.nan, r"preprocess_p: expected a finite number in \(0, 87\]"),
    ("preprocess_p", math.inf, r"preprocess_p: expected a finite number in \(0, 87\]"),
    ("hidden_size", 0, "hidden_size: expected a positive int"),
    ("hidden_size", 4.0, "hidden_size: expected a positive int"),
    ("hidden_size", True, "hidden_size: expected a positive int"),
    ("num_layers", -2, "num_layers: expected a positive int"),
    ("output", "sigmoid", "output: expected one of"),
    ("output", 1, "output: expected one of"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("key, value, match", CONSTANTS, ids=[f"{k}={v!r}" for k, v, _ in CONSTANTS])
def test_a_constant_out_of_range_is_refused(tmp_path, layout, key, value, match):
    """Pins: output_scale NaN in a file's net arguments loaded silently; preprocess_p must keep e^p and e^-p
    normal float32 numbers (p <= 87)."""
    kwargs = {**small_net().size_kwargs(), key: value}
    refusal(write_net(tmp_path / "opt.pt", layout, kwargs=kwargs), layout, match)


def test_preprocess_p_87_is_the_largest_accepted(tmp_path):
    kwargs = {**small_net().size_kwargs(), "preprocess_p": 87}
    assert load_pretrained(str(write_net(tmp_path / "opt.pt", "verified", kwargs=kwargs))).preprocess_p == 87.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_unknown_net_argument_is_refused_by_name(tmp_path, layout):
    kwargs = {**small_net().size_kwargs(), "momentum": 0.9}
    refusal(write_net(tmp_path / "opt.pt", layout, kwargs=kwargs), layout, r"unknown net argument 'momentum'")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_missing_net_argument_is_refused_by_name(tmp_path, layout):
    kwargs = {k: v for k, v in small_net().size_kwargs().items() if k != "preprocess_p"}
    refusal(write_net(tmp_path / "opt.pt", layout, kwargs=kwargs), layout, r"missing net argument 'preprocess_p'")


@pytest.mark.parametrize("layout", ["verified", "run"])
def test_the_output_kind_round_trips(tmp_path, layout):
    """A tanh net's file says so (an exported one and a run's); the same weights step identically after loading."""
    net = small_net(output="tanh", features=("paper", "moments"))
    loaded = load_pretrained(str(write_net(tmp_path / "opt.pt", layout, net)))
    assert loaded.output == "tanh" and loaded.size_kwargs() == net.size_kwargs()
    grad = torch.randn(6, generator=torch.Generator().manual_seed(1))
    moments = net.advance_moments(grad, net.init_moments(6))
    assert torch.equal(loaded(grad, loaded.init_state(6), moments)[0], net(grad, net.init_state(6), moments)[0])


class FeaturesNet(CoordinatewiseLSTM):
    """CoordinatewiseLSTM as it gains `features`: its constructor validates the value."""

    def __init__(self, features="raw", **kwargs):
        if features not in ("raw", "scale-free"):
            raise ValueError(f"features: expected 'raw' or 'scale-free', got {features!r}")
        self.features_seen = features
        super().__init__(**kwargs)


def test_features_reaches_the_constructor_which_validates_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "CoordinatewiseLSTM", FeaturesNet)
    kwargs = {**small_net().size_kwargs(), "features": "scale-free"}
    good = load_pretrained(str(write_net(tmp_path / "good.pt", "verified", kwargs=kwargs)))
    assert good.features_seen == "scale-free"
    kwargs["features"] = "log"
    refusal(write_net(tmp_path / "bad.pt", "verified", kwargs=kwargs), "verified", r"features: expected 'raw'")


STRUCTURES = {  # case: (kwargs, state -> changed kwargs, state), the reason expected
    "missing-weight": (lambda kw, st: (kw, {k: v for k, v in st.items() if k != "out.bias"}),
                       r"missing weight 'out.bias'"),
    "extra-weight": (lambda kw, st: (kw, {**st, "lstm.weight_ih_l9": st["out.bias"]}),
                     r"unexpected weight 'lstm.weight_ih_l9'"),
    "wrong-shape": (lambda kw, st: (kw, {**st, "lstm.weight_hh_l1": torch.zeros(16, 5)}),
                    r"weight 'lstm.weight_hh_l1' has shape \(16, 5\), the net arguments give \(16, 4\)"),
    "sizes-of-another-net": (lambda kw, st: ({**kw, "hidden_size": 5}, st),
                             r"weight 'lstm.weight_ih_l0' has shape \(16, 2\), the net arguments give \(20, 2\)"),
    "hidden-size-the-file-cannot-hold": (lambda kw, st: ({**kw, "hidden_size": 2**20}, st),  # allocates nothing
                                         r"weight 'lstm.weight_ih_l0' has shape \(16, 2\), the net arguments give "
                                         r"\(4194304, 2\)"),
    "hidden-size-past-int64": (lambda kw, st: ({**kw, "hidden_size": 2**62}, st), r"the net refuses its arguments"),
    "not-a-tensor": (lambda kw, st: (kw, {**st, "out.bias": [0.0]}), r"weight 'out.bias' is a list, not a tensor"),
    "kwargs-not-a-dict": (lambda kw, st: ([20, 2], st), r"net_kwargs is a list, not a dict"),
    "weights-not-a-dict": (lambda kw, st: (kw, list(st.values())), r"state_dict is a list, not a dict"),
}


@pytest.mark.parametrize("layout", ["verified", "unverified"])
@pytest.mark.parametrize("case", sorted(STRUCTURES))
def test_a_file_of_another_structure_is_refused(tmp_path, layout, case):
    change, match = STRUCTURES[case]
    net = small_net()
    kwargs, state = change(net.size_kwargs(), {k: v.detach() for k, v in net.state_dict().items()})
    refusal(write(tmp_path / "opt.pt", layout, kwargs, state), layout, match)


@pytest.mark.parametrize("content, match", [
    (torch.zeros(3), "holds a Tensor, not"),
    ({"weights": 1}, "holds neither"),
    ({"format": "l2l_fast.pretrained.v9", "sha256": "", "body": b"\x00"}, "unknown format 'l2l_fast.pretrained.v9'"),
], ids=["tensor", "foreign-dict", "newer-format"])
def test_a_foreign_torch_file_is_refused(tmp_path, content, match):
    torch.save(content, tmp_path / "opt.pt")
    refusal(tmp_path / "opt.pt", "", match)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_pickle_that_would_run_code_is_refused_as_one_value_error(tmp_path, layout):
    """Pins: a file whose (checksummed) body trips the weights-only unpickler leaked torch's raw, dozen-line
    UnpicklingError; and proves such a pickle is never run, in every layout."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "opt.pt"
    evil = {"net_kwargs": small_net().size_kwargs(), "state_dict": {"out.bias": RunsCode(marker)}}
    if layout == "unverified":
        torch.save(evil, path)
    elif layout == "verified":
        body = torch_bytes(evil)
        torch.save({"format": PRETRAINED_FORMAT, "sha256": hashlib.sha256(body).hexdigest(), "body": body}, path)
    else:
        save_atomic({"config": {}, "net": {"out.bias": RunsCode(marker)}, "score": 1.0, "epoch": 1}, path)
    message = refusal(path, layout, "refused by torch's weights-only unpickler")
    assert ("io.open" in message or "builtins.open" in message) and not marker.exists()


def test_the_refusals_leave_no_torch_exception_behind(tmp_path):
    """Pins: a file missing an entry raised a bare KeyError('state_dict') inside the loader; it is one
    ValueError that says which entry is missing."""
    torch.save({"net_kwargs": small_net().size_kwargs()}, tmp_path / "opt.pt")
    message = refusal(tmp_path / "opt.pt", "", r"missing entry 'state_dict'")
    assert "KeyError" not in message


# --- names and paths --------------------------------------------------------------------------------------


def test_a_pth_file_loads_as_a_file(tmp_path, monkeypatch):
    """Pins: a valid `opt.pth` was taken for a shipped name ("no shipped optimizer named 'opt.pth'")."""
    net = small_net()
    save_pretrained(net, tmp_path / "opt.pth")
    assert bit_equal(load_pretrained(str(tmp_path / "opt.pth")).out.weight, net.out.weight)
    monkeypatch.chdir(tmp_path)
    assert bit_equal(load_pretrained("opt.pth").out.weight, net.out.weight)


@pytest.mark.parametrize("spec, expected", [
    ("mnist", "shipped:mnist"), ("pretrained:quadratic", "shipped:quadratic"),
    ("opt.pt", "opt.pt"), ("opt.pth", "opt.pth"), ("opt.BIN", "opt.BIN"), ("sub/opt", "sub/opt"),
    ("written", "written"),  # no suffix, but a file here
    ("quadratic", "shipped:quadratic"),  # a file of a shipped name here does not shadow the shipped one
    ("./quadratic", "quadratic"),  # ... unless named as a path
])
def test_a_spec_is_a_path_or_a_shipped_name(tmp_path, monkeypatch, spec, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "written").write_bytes(b"")
    (tmp_path / "quadratic").write_bytes(b"")
    path = pretrained.resolve(spec)
    if expected.startswith("shipped:"):
        assert path == SHIPPED_DIR / f"{expected.split(':')[1]}.pt"
    else:
        assert path == Path(expected)


@pytest.mark.parametrize("spec", ["nope", "pretrained:nope", "mnist2"])
def test_an_unknown_name_lists_the_shipped_ones(spec):
    shipped = r"\['general', 'general_short', 'mnist', 'quadratic'\]"
    with pytest.raises(ValueError, match=r"no shipped optimizer named .*available: " + shipped):
        load_pretrained(spec)


def test_a_missing_path_is_file_not_found(tmp_path):
    for spec in (str(tmp_path / "absent.pth"), str(tmp_path / "dir" / "absent")):
        with pytest.raises(FileNotFoundError):
            load_pretrained(spec)


def test_save_refuses_a_net_the_loader_would_refuse(tmp_path):
    net = small_net()
    with torch.no_grad():
        net.out.bias.fill_(math.nan)
    with pytest.raises(ValueError, match="weight 'out.bias' has 1 non-finite value"):
        save_pretrained(net, tmp_path / "opt.pt")
    assert not (tmp_path / "opt.pt").exists()
    assert not os.listdir(tmp_path)
