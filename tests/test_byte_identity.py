"""Byte identity: every registered pass, on every sample model, writes pinned bytes.

A refactoring must not change what a pass writes. This test runs each pass (with its
defaults, and with the options the sample models need) through ``onnxopt.optimize``
on the committed sample models, with fixed data and seed, and compares the SHA-256
of the saved model with the digest pinned in ``PINS`` — one line per (pipeline,
model), so that a change of behaviour made on purpose updates only its own lines.

To see the current digests (after an intended change): ``python
tests/test_byte_identity.py`` prints the whole ``PINS`` table; copy the lines of the
pass you changed, and say so in the commit. The digests hold for the versions of onnx,
onnxruntime and numpy the project installs; a new version of one of them may change
the numbers a pass computes, and then this test says so.

The digests also depend on the CPU's kernels: OpenBLAS and NumPy pick AVX-512 code
paths on CPUs that have them, and those sum in a different order than the AVX2 ones,
so a least-squares refit or a k-means step lands on a neighbouring float. The passes
run here in a child process with ``NUMERIC_ENV`` (OpenBLAS's Haswell kernels, NumPy's
AVX-512 dispatch off), which gives the same bytes on AVX2 and AVX-512 machines (see
"Reproducible bytes" in docs/design.md). onnxruntime-training's own kernels cannot be
steered that way, so ``distill`` has one pin per instruction set (``DISTILL_PINS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DATA = MODELS / "digits_test.npz"
SAMPLE_MODELS = ("digits_mlp", "digits_cnn", "digits_transformer", "digits_mlp_op11_constants")

# Each registered pass with its defaults, plus the options a sample model needs (a
# required option, or a second code path worth pinning). quantize-int8 skips only its
# latency measurement, which is reported and never changes the model.
PIPELINES = (
    "cleanup",
    "clip-weights",
    "clip-weights(granularity=channel,percentile=90)",
    "compact",
    "dedupe-initializers",
    "fold-batchnorm",
    "fold-constants",
    "prune-initializers",
    "prune-initializers(sparsity=0.8,store=sparse)",
    "prune-initializers(method=wanda,pattern=2:4)",
    "quantize-int4",
    "quantize-int4(format=matmulnbits)",
    "quantize-int8(latency=false)",
    "quantize-int8(latency=false,speed=none)",
    "quantize-int8(latency=false,weights_only=true)",
    "remove-dead-neurons",
    "remove-neurons(ratio=0.25)",
    "share-weights",
    "share-weights(bits=4)",
    "share-weights(bits=4,granularity=channel,scope=weights)",
    "upgrade-opset",
    "upgrade-opset(target=21)",
)
# distill trains in the adjunct venv (torch): pinned separately, see test_distill_bytes.
DISTILL = (
    "prune-initializers(sparsity=0.7,reconstruct=false),"
    'distill(epochs=1,data="models/digits_train.npz",labels=label)'
)

PINS: dict[str, dict[str, str]] = {
    "cleanup": {
        "mlp": "422e6411b48c95995d61bc9b78d4e6ac9f2bc30a5d5158f99fae3d0d4a5c374f",
        "cnn": "53ac9e6748135176a579a18e90d9c56fc906e7b25846b138848439fce5d223df",
        "transformer": "e4da8391cabb70f1e45fc597e0d7f95ec8cde87eac37dd0dd33f7879e8678c12",
        "op11": "14eba4b08b06ae95f5370842f1968d0918140049962f8df7a1221e9b134e9aa7",
    },
    "clip-weights": {
        "mlp": "127adf74275fad4d173372133186f3cc18cbccbdfbb13c0a6bedeca59b4b8caa",
        "cnn": "729f551e0038e7488785b5a7561d12767154435afbc89ac97757d20d281fb1e7",
        "transformer": "f5f2c5c5cb4d3063fd80879d5e95684cc25467ec3ef2b749ce0d9a215e7b49e2",
        "op11": "b0f883c1a5587e7818c8cc882f6d609870efde24f19cb3b404428b78dbec684d",
    },
    "clip-weights(granularity=channel,percentile=90)": {
        "mlp": "63c0dc505557c4acc29e11e0bfef74f731feca00738e5ff7c155f546abf264b3",
        "cnn": "6c238318d297eeb5c1554788aec65e51fcd4cfc9fa837c55fd23cd61674704b2",
        "transformer": "a674ebb136bdb7a8159e538c2b43cd3adf120c7006b180b771bea9b247368437",
        "op11": "78e5421d115df03f6742c38e89ee979c88d7c8e5302e12a257e341eff947a8ff",
    },
    "compact": {
        "mlp": "27e9a0b4279d8bc7c8038a14572f53f650115c9cc2876ff94385de7dd7251761",
        "cnn": "edc869b268571c45107216676b1017a4eb3f97aba662b4a7c889b85717409963",
        "transformer": "4d83e5d1cfeb1cd8eb949f7de5e26df03e7ee8ed8114b6daf2d79294d8b3f57c",
        "op11": "e547f6fab68412131d8e3a5427c48a17e8c1109b828572de44fc14381a559366",
    },
    "dedupe-initializers": {
        "mlp": "422e6411b48c95995d61bc9b78d4e6ac9f2bc30a5d5158f99fae3d0d4a5c374f",
        "cnn": "53ac9e6748135176a579a18e90d9c56fc906e7b25846b138848439fce5d223df",
        "transformer": "3d834ad9652edee505b5c51b0700a4d00c84f1836529e6771e10286ad6cf195f",
        "op11": "14eba4b08b06ae95f5370842f1968d0918140049962f8df7a1221e9b134e9aa7",
    },
    "fold-batchnorm": {
        "mlp": "422e6411b48c95995d61bc9b78d4e6ac9f2bc30a5d5158f99fae3d0d4a5c374f",
        "cnn": "bab653e81028662851c62ffffb11192e4069d8201c537f4bfc6c3f4e78af3a95",
        "transformer": "e4da8391cabb70f1e45fc597e0d7f95ec8cde87eac37dd0dd33f7879e8678c12",
        "op11": "14eba4b08b06ae95f5370842f1968d0918140049962f8df7a1221e9b134e9aa7",
    },
    "fold-constants": {
        "mlp": "422e6411b48c95995d61bc9b78d4e6ac9f2bc30a5d5158f99fae3d0d4a5c374f",
        "cnn": "53ac9e6748135176a579a18e90d9c56fc906e7b25846b138848439fce5d223df",
        "transformer": "e4da8391cabb70f1e45fc597e0d7f95ec8cde87eac37dd0dd33f7879e8678c12",
        "op11": "14eba4b08b06ae95f5370842f1968d0918140049962f8df7a1221e9b134e9aa7",
    },
    "prune-initializers": {  # damping 0.1 since 2026-12-06
        "mlp": "ac5aa777d415c09867aab70a3ffde8ee937522e56eddf1f31ea0e1c58b40ea0b",
        "cnn": "4d2e04afa472e955621ecbbc6a601941af158fc841471cda930fc34992b5e501",
        "transformer": "51e343b161b775cdfea1152e738bfcfd44829536d47f01953b2b30a0d5855fd6",
        "op11": "cfac2746e3e044f96fe6fdcada44e242a03ce8293c4265498af4ec3dd5713d06",
    },
    "prune-initializers(sparsity=0.8,store=sparse)": {  # damping 0.1 since 2026-12-06
        "mlp": "751127532d66a768decf97d6a1bb6e7d930b3fe8ee40dcaf61723836fe43dae3",
        "cnn": "d5fd557ad27ad29c8e531ec544145cffc60cc8007838904fd23915e82388217c",
        "transformer": "03079f021d967be81a7bf12d3a6736f7100c76be56d5db8c42b6fb9a27ff12c7",
        "op11": "df965f2315133f543e59ca80596c0370fbb88783741e1cb75a06d6d5c72d6328",
    },
    "prune-initializers(method=wanda,pattern=2:4)": {
        "mlp": "9182dc16b78ecdc9ed50ce5479599308a2ba169e8bc00aace785748f473ab121",
        "cnn": "8b4d7b9b708d2e90032cffcf4c0af36af3db05224157f36db5eadb4ef6d47c4a",
        "transformer": "f99f2953509aad1dd0e2f4a92eaf5beb6a1e407719bafdbddc9711b188080ad5",
        "op11": "3ba8c22321781b0ce2184485d7c620a515db36a433d991d828cf607758f503ee",
    },
    "quantize-int4": {
        "mlp": "5b1bd1e116667687a088d2b8fed2c884d10d8d3bbb7a26ddbe22fff934d130c1",
        "cnn": "6d4b8ac1ff09f9531f6683a067a068f3bfc17dcdc2f75dd7c2bcfe48c7c2e9bb",
        "transformer": "751234350e8d29dd49cf954c97b43b73ec24e44b1629152d74d3f25bdf3eb845",
        "op11": "c96bbbe27b6689b26b44f456d97ff5322cd37db586317289c82d9c61a43f3c62",
    },
    "quantize-int4(format=matmulnbits)": {
        "mlp": "5b1bd1e116667687a088d2b8fed2c884d10d8d3bbb7a26ddbe22fff934d130c1",
        "cnn": "6d4b8ac1ff09f9531f6683a067a068f3bfc17dcdc2f75dd7c2bcfe48c7c2e9bb",
        "transformer": "c1dc5d6bab17e32c97261570a244133ef7fd605410e5fa489a05454736d69333",
        "op11": "c96bbbe27b6689b26b44f456d97ff5322cd37db586317289c82d9c61a43f3c62",
    },
    "quantize-int8(latency=false)": {
        "mlp": "5b059f5a9d47e1d700f13f945d459c1a72f909ff21169ea14955326c5ea46046",
        # speed=rule (default since 2026-12-06): the stem and depthwise Convs stay float
        "cnn": "084214b9a16b2999cf8ee65a49f269aa78207475481d6bf07d798bf20f1deb6a",
        "transformer": "059924ce595240b9955b3119f5693ab47528c0615076054f8300b4907f970262",
        "op11": "9c21fc0a037871e690a12689d6506c50e6e6a90d9fe80fc3a02d21bc3740a1b1",
    },
    "quantize-int8(latency=false,speed=none)": {  # the default before speed=rule
        "mlp": "5b059f5a9d47e1d700f13f945d459c1a72f909ff21169ea14955326c5ea46046",
        "cnn": "1dcff4f5ad7c48226303bee8950d68ffeb361cc2c0009ad22481b1d0c3117301",
        "transformer": "059924ce595240b9955b3119f5693ab47528c0615076054f8300b4907f970262",
        "op11": "9c21fc0a037871e690a12689d6506c50e6e6a90d9fe80fc3a02d21bc3740a1b1",
    },
    "quantize-int8(latency=false,weights_only=true)": {
        "mlp": "0aaaea7b69f8fe1fb1c512939bb6a333ec2960e8e38d10a403b2306e45f6bb41",
        "cnn": "e6fef6db536e9511a0cae74f870ef644402e54099a52556c6982149d345160f4",
        "transformer": "987c7be14cf77237e281003991ff54718da8ab1ddba5067c158a17833e9402b1",
        "op11": "a8be5592243e0f4b4fedecc8f844cb5fdeeaaa18612a85149ff1c64483f566bc",
    },
    "remove-dead-neurons": {
        "mlp": "422e6411b48c95995d61bc9b78d4e6ac9f2bc30a5d5158f99fae3d0d4a5c374f",
        "cnn": "53ac9e6748135176a579a18e90d9c56fc906e7b25846b138848439fce5d223df",
        "transformer": "e4da8391cabb70f1e45fc597e0d7f95ec8cde87eac37dd0dd33f7879e8678c12",
        "op11": "14eba4b08b06ae95f5370842f1968d0918140049962f8df7a1221e9b134e9aa7",
    },
    "remove-neurons(ratio=0.25)": {
        "mlp": "a7823fbe8cb8cb9ce57b8a046f1731404394eca11f7bf719184ac8e447b8f32c",
        "cnn": "334eaf0e392d5fa6e33af8bbea3ed806e54b8f9ecc8a146f4ef2b0e532c0694a",
        "transformer": "09549442dfecbb5bb3d194fbf3c7e10dd0c9e56a2e5ce867a7df69a3f9302d9b",
        "op11": "6735d7eb38e36663ce23108a94758451fe9991f69719f9897633c8e4040f5dda",
    },
    "share-weights": {  # bits=auto (the default since 2026-12-06)
        "mlp": "eabcaa4f5a13b2c8a0ab5eb21815e1d456811d14ad527938d87cac784aacbecb",
        # BatchNorm folded first (share-weights requires fold-batchnorm)
        "cnn": "9a65632a9835270bf9078ba9b76ab879ae53343ba715732d3aed2669d9912c6e",
        "transformer": "310c78ee0789cb74fbd8b188b1cc832bb24fda1cab74bbe2afdac9cdf51cefde",
        "op11": "eabcaa4f5a13b2c8a0ab5eb21815e1d456811d14ad527938d87cac784aacbecb",
    },
    "share-weights(bits=4)": {  # the default before bits=auto
        "mlp": "820d39fb7c514850248c5b9e85c506a4de40bfc50e522840736bc5b8033cea01",
        # BatchNorm folded first (share-weights requires fold-batchnorm)
        "cnn": "0cac6f828b798760f296a9832e559a8946aeb1432774783cd5c5988dc51ba3cd",
        "transformer": "e8ce4120ce7d7155f51d940e3019388c76409eefc540fa11c5a7f752b772f94b",
        "op11": "820d39fb7c514850248c5b9e85c506a4de40bfc50e522840736bc5b8033cea01",
    },
    "share-weights(bits=4,granularity=channel,scope=weights)": {
        "mlp": "0fd27640239f9ff11941af89eaa7e5887379980cbee845f65d94ef5d1e376e60",
        # BatchNorm folded first (share-weights requires fold-batchnorm)
        "cnn": "73e557795ccca69fc183de6bf6c656c75ac370d998c9b1065d56e835e13e71fb",
        "transformer": "b7efd37adca01d6056b05a29caa49993a3be57ba081d957e317c01deac2ef933",
        "op11": "0fd27640239f9ff11941af89eaa7e5887379980cbee845f65d94ef5d1e376e60",
    },
    "upgrade-opset": {
        "mlp": "422e6411b48c95995d61bc9b78d4e6ac9f2bc30a5d5158f99fae3d0d4a5c374f",
        "cnn": "53ac9e6748135176a579a18e90d9c56fc906e7b25846b138848439fce5d223df",
        "transformer": "e4da8391cabb70f1e45fc597e0d7f95ec8cde87eac37dd0dd33f7879e8678c12",
        "op11": "66ed20f0ff06d53fd8722a467ca48cc030dd63fd7c2414e5ef00e98fdea969c5",
    },
    "upgrade-opset(target=21)": {
        "mlp": "4919e3a03232654b7007a8c1810a675f9a612e2439aef065cfb4bf63787c5b89",
        "cnn": "e93e879b021d669f3c08bbed037c69e6dcb6332656d7cb326b67b86ae60c2ab2",
        "transformer": "6b63c078e5c1d8b2f047696a377ac3bcfa59602cc3d1b765b9f0f298af33b591",
        "op11": "74526f853209c0117f929583d1bffecdc00f0b7569e138a370bbf0ff424c523b",
    },
}
# The pipeline DISTILL on digits_mlp, per instruction set of the CPU that trains it
# (onnxruntime-training's MLAS kernels differ between AVX2 and AVX-512).
DISTILL_PINS: dict[str, str] = {
    "avx2": "498cdd8e8887027c97cc03a5a08d286e4fee3109e4de30b51707449bfec8aabb",
    "avx512": "8705aa45dfb0b32b2484850838e908c2ae54dd9d7489a326a71c697dbd6f8321",
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def isa() -> str | None:
    """'avx512' or 'avx2' for this x86 CPU, None where neither is known."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return None


def numeric_env() -> dict[str, str]:
    """Environment that makes OpenBLAS and NumPy use the AVX2 kernels on this CPU."""
    env = dict(os.environ)
    flags = _cpu_flags()
    if "avx2" in flags:
        env["OPENBLAS_CORETYPE"] = "Haswell"
    if "avx512f" in flags:
        env["NPY_DISABLE_CPU_FEATURES"] = "X86_V4 AVX512_ICL AVX512_SPR"
    return env


def saved_digest(pipeline: str, model: str) -> str:
    """SHA-256 of the bytes ``optimize`` saves for ``pipeline`` on a sample model."""
    import onnxopt

    here = os.getcwd()
    os.chdir(ROOT)  # paths in pipeline text are relative to the repository
    try:
        result = onnxopt.optimize(
            str(MODELS / f"{model}.onnx"),
            pipeline,
            data=str(DATA),
            budget="none",
            seed=0,
            calibration_samples=16,
            validation_samples=8,
        )
    finally:
        os.chdir(here)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = result.save(Path(tmp) / "out.onnx")
            return hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        result.close()


def _short(model: str) -> str:
    return {"digits_mlp_op11_constants": "op11"}.get(model, model.removeprefix("digits_"))


CASES = [(p, m) for p in PIPELINES for m in SAMPLE_MODELS]


def digests_in_child(cases: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Digests of ``cases`` computed in a child process that runs with ``numeric_env()``.

    The kernels are chosen when NumPy and OpenBLAS load, so the environment must be set
    before the interpreter starts: this process already has them loaded.
    """
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--json"],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=numeric_env(),
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, f"digest worker failed:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(p, m): d for p, m, d in rows}


@pytest.fixture(scope="module")
def digests(request) -> dict[tuple[str, str], str]:
    """Digests of the cases this session selected, all from one child process."""
    wanted = [
        (item.callspec.params["pipeline"], item.callspec.params["model"])
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_pass_writes_the_pinned_bytes"
    ]
    return digests_in_child(wanted)


@pytest.mark.parametrize("pipeline,model", CASES, ids=[f"{p}@{_short(m)}" for p, m in CASES])
def test_pass_writes_the_pinned_bytes(pipeline, model, digests):
    pinned = PINS.get(pipeline, {}).get(_short(model))
    assert pinned is not None, f"no pin for {pipeline} on {model}: add its line"
    assert digests[(pipeline, model)] == pinned


def test_every_registered_pass_is_pinned():
    from onnxopt.pipeline import registry

    built_in = {n for n, cls in registry().items() if cls.__module__.startswith("onnxopt.passes")}
    pinned = {step.split("(")[0] for p in (*PIPELINES, DISTILL) for step in p.split("),")}
    assert built_in <= pinned, sorted(built_in - pinned)


def test_distill_writes_the_pinned_bytes():
    from onnxopt.train import TrainEnvError, env

    try:
        env.find_python()
    except TrainEnvError as exc:
        if os.environ.get("ONNXOPT_REQUIRE_TRAIN_ENV") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    kind = isa()
    if kind not in DISTILL_PINS:
        pytest.skip(f"no distill pin for this CPU kind ({kind or 'unknown'})")
    assert saved_digest(DISTILL, "digits_mlp") == DISTILL_PINS[kind]


def _print_pins() -> None:
    digests = digests_in_child(CASES)
    print("PINS: dict[str, dict[str, str]] = {")
    for pipeline in PIPELINES:
        print(f'    "{pipeline}": {{')
        for model in SAMPLE_MODELS:
            print(f'        "{_short(model)}": "{digests[(pipeline, model)]}",')
        print("    },")
    print("}")
    print(f'DISTILL_PINS["{isa()}"] = "{saved_digest(DISTILL, "digits_mlp")}"')


def _json_worker() -> None:
    """``--json``: read [[pipeline, model], ...] on stdin, print their digests as JSON."""
    cases = json.loads(sys.stdin.read())
    rows = [[p, m, saved_digest(p, m)] for p, m in cases]
    print(json.dumps(rows))


if __name__ == "__main__":
    if "--json" in sys.argv[1:]:
        _json_worker()
    else:
        _print_pins()
