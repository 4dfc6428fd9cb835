"""fold-constants, fold-batchnorm, dedupe-initializers: structure, numbers, no-op, idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
import pytest
from conftest import MODELS, apply_pass, digits, run
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.check import assert_equivalent
from onnxopt.data import prepare_samples
from onnxopt.errors import UsageError
from onnxopt.graph import to_graph
from onnxopt.pipeline import Pipeline, get_pass

# ---------------------------------------------------------------------------- helpers


def build(text: str, seed: int = 0, **weights: np.ndarray | tuple[int, ...]) -> onnx.ModelProto:
    """Parse ``text`` and add initializers: arrays as given, shapes filled with seeded
    N(0, 1) values (names ending in ``var`` get positive values)."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, value in weights.items():
        if isinstance(value, tuple):
            value = rng.standard_normal(value).astype(np.float32)
            if name.endswith("var"):
                value = np.abs(value) + 0.5
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model)
    return model


apply = apply_pass


def feeds(model: onnx.ModelProto, count: int = 4, **shapes: tuple[int, ...]) -> list[dict]:
    return prepare_samples(
        model, shapes=shapes or None, seed=0, calibration_samples=0, validation_samples=count
    ).validation


def assert_lossless(before: onnx.ModelProto, after: onnx.ModelProto, samples=None) -> None:
    onnx.checker.check_model(after, full_check=True)
    samples = samples or feeds(before)
    assert_equivalent(run(before, samples), run(after, samples))


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    (found,) = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(found)


def check_pass(name: str, model: onnx.ModelProto, samples=None, **options) -> tuple:
    """Apply, check numbers, then check that a second run changes nothing."""
    out, result = apply(name, model, **options)
    assert result.changed
    assert_lossless(model, out, samples)
    again, second = apply(name, out, **options)
    assert not second.changed, second.counts
    assert again.SerializeToString() == out.SerializeToString()
    return out, result


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
BN_WEIGHTS = {"gamma": (4,), "beta": (4,), "mean": (4,), "var": (4,)}


# ---------------------------------------------------------------------------- fold-batchnorm


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batchnorm_conv(with_bias: bool) -> None:
    bias = ", b" if with_bias else ""
    model = build(
        f"""{HEADER}
        g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {{
          c = Conv<pads=[1, 1, 1, 1]>(x, w{bias})
          n = BatchNormalization<epsilon=0.001>(c, gamma, beta, mean, var)
          y = Relu(n)
        }}""",
        w=(4, 3, 3, 3),
        **({"b": (4,)} if with_bias else {}),
        **BN_WEIGHTS,
    )
    out, result = check_pass("fold-batchnorm", model)
    assert ops(out) == ["Conv", "Relu"]
    assert len(out.graph.node[0].input) == 3  # a bias was created when missing
    assert out.graph.node[0].output[0] == "n"  # the Conv took over the BN output
    assert result.counts["conv_folded"] == 1 and result.counts["skipped"] == 0


def test_fold_batchnorm_conv_transpose_with_groups() -> None:
    # W is [C_in, C_out/group, k, k]: 4 inputs, group 2 -> 2 x 3 = 6 output channels.
    model = build(
        f"""{HEADER}
        g (float[1, 4, 5, 5] x) => (float[1, 6, 7, 7] y) {{
          c = ConvTranspose<group=2>(x, w, b)
          y = BatchNormalization(c, gamma, beta, mean, var)
        }}""",
        w=(4, 3, 3, 3),
        b=(6,),
        gamma=(6,),
        beta=(6,),
        mean=(6,),
        var=(6,),
    )
    out, result = check_pass("fold-batchnorm", model)
    assert ops(out) == ["ConvTranspose"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert result.counts["convtranspose_folded"] == 1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_batchnorm_gemm(trans_b: int) -> None:
    weight = (4, 5) if trans_b else (5, 4)
    model = build(
        f"""{HEADER}
        g (float[3, 5] x) => (float[3, 4] y) {{
          h = Gemm<transB={trans_b}, alpha=0.5, beta=2.0>(x, w, b)
          y = BatchNormalization(h, gamma, beta, mean, var)
        }}""",
        w=weight,
        b=(4,),
        **BN_WEIGHTS,
    )
    out, result = check_pass("fold-batchnorm", model)
    assert ops(out) == ["Gemm"]
    assert result.counts["gemm_folded"] == 1


def test_fold_batchnorm_gemm_without_bias() -> None:
    model = build(
        f"""{HEADER}
        g (float[3, 5] x) => (float[3, 4] y) {{
          h = Gemm(x, w)
          y = BatchNormalization(h, gamma, beta, mean, var)
        }}""",
        w=(5, 4),
        **BN_WEIGHTS,
    )
    out, _ = check_pass("fold-batchnorm", model)
    assert ops(out) == ["Gemm"] and len(out.graph.node[0].input) == 3


def test_fold_batchnorm_leaves_a_shared_weight_alone() -> None:
    model = build(
        f"""{HEADER}
        g (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y, float[1, 4, 5, 5] z) {{
          c = Conv<pads=[1, 1, 1, 1]>(x, w)
          y = BatchNormalization(c, gamma, beta, mean, var)
          z = Conv<pads=[1, 1, 1, 1]>(x, w)
        }}""",
        w=(4, 3, 3, 3),
        **BN_WEIGHTS,
    )
    out, _ = check_pass("fold-batchnorm", model)
    folded, plain = out.graph.node
    assert plain.input[1] == "w" and folded.input[1] != "w"
    np.testing.assert_array_equal(initializer(out, "w"), initializer(model, "w"))


def test_fold_batchnorm_never_writes_into_shared_arrays() -> None:
    # Graph.copy() shares weight arrays: folding a copy must not change the original.
    model = build(
        f"""{HEADER}
        g (float[1, 3, 5, 5] x) => (float[1, 4, 3, 3] y) {{
          c = Conv(x, w, b)
          y = BatchNormalization(c, gamma, beta, mean, var)
        }}""",
        w=(4, 3, 3, 3),
        b=(4,),
        **BN_WEIGHTS,
    )
    original = to_graph(model)
    constants = {n: t for n, t in original.tensors().items() if isinstance(t, gs.Constant)}
    before = {name: tensor.values.copy() for name, tensor in constants.items()}
    copy = original.copy()
    cls = get_pass("fold-batchnorm")
    assert cls().run(copy, None).changed
    for name, values in before.items():
        np.testing.assert_array_equal(constants[name].values, values)


def test_fold_batchnorm_skips_with_reasons() -> None:
    model = build(
        f"""{HEADER}
        g (float[1, 3, 5, 5] x) => (float[1, 4, 3, 3] y, float[1, 4, 3, 3] c,
                                   float[1, 4, 3, 3] t, float[1, 4, 3, 3] r) {{
          c = Conv(x, w)
          y = BatchNormalization(c, gamma, beta, mean, var)
          d = Conv(x, w)
          t = BatchNormalization<training_mode=1>(d, gamma, beta, mean, var)
          e = Conv(x, w)
          f = Relu(e)
          r = BatchNormalization(f, gamma, beta, mean, var)
        }}""",
        w=(4, 3, 3, 3),
        **BN_WEIGHTS,
    )
    out, result = apply("fold-batchnorm", model)
    assert not result.changed
    assert ops(out).count("BatchNormalization") == 3
    reasons = " | ".join(s.reason for s in result.skipped)
    assert "graph output" in reasons and "training_mode=1" in reasons and "Relu" in reasons
    assert result.counts["skipped"] == 3 and len(result.notes) == 3


def test_fold_batchnorm_no_op_through_the_manager() -> None:
    model = build(
        f"""{HEADER}
        g (float[1, 3, 5, 5] x) => (float[1, 4, 3, 3] y) {{
          c = Conv(x, w)
          y = Relu(c)
        }}""",
        w=(4, 3, 3, 3),
    )
    (step,) = onnxopt.optimize(model, "fold-batchnorm").steps
    assert step["status"] == "no-op"
    assert step["counts"]["conv_folded"] == 0


def test_fold_batchnorm_on_the_digits_cnn() -> None:
    path = MODELS / "digits_cnn.onnx"
    result = onnxopt.optimize(path, "fold-batchnorm,cleanup", data=MODELS / "digits_test.npz")
    fold, _ = result.steps
    assert fold["status"] == "accepted" and fold["counts"]["conv_folded"] == 5
    assert fold["metrics_vs_original"]["logits"]["max_abs"] < 1e-5
    assert "BatchNormalization" not in ops(result.model)
    images, _ = digits("test")
    original = onnx.load(str(path))
    (expected,) = run(original, [{"input": images}])[0].values()
    (got,) = run(result.model, [{"input": images}])[0].values()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    (again,) = onnxopt.optimize(result.model, "fold-batchnorm").steps
    assert again["status"] == "no-op"


# ---------------------------------------------------------------------------- fold-constants


def test_fold_constants_constant_chain() -> None:
    model = build(
        f"""{HEADER}
        g (float[2, 3] x) => (float[2, 3] y) {{
          s = Mul(k, k)
          t = Sub(s, m)
          u = Transpose<perm=[1, 0]>(t)
          y = Add(x, u)
        }}""",
        k=(3, 2),
        m=(3, 2),
    )
    out, result = check_pass("fold-constants", model)
    assert ops(out) == ["Add"]
    assert result.counts["nodes_folded"] == 3 and result.counts["skipped"] == 0
    assert result.details["folded_ops"] == {"Mul": 1, "Sub": 1, "Transpose": 1}


SHAPE_CHAIN = f"""{HEADER}
g (float[B, 3, 4] x) => (float[B, 12] y, int64[1] last) {{
  s = Shape(x)
  i1 = Constant<value=int64[1] {{1}}>()
  i2 = Constant<value=int64[1] {{2}}>()
  d1 = Gather<axis=0>(s, i1)
  d2 = Gather<axis=0>(s, i2)
  p = Mul(d1, d2)
  neg = Constant<value=int64[1] {{-1}}>()
  target = Concat<axis=0>(neg, p)
  y = Reshape(x, target)
  last = Shape<start=-1>(x)
}}"""


def test_fold_constants_shape_chain_with_dynamic_batch() -> None:
    model = build(SHAPE_CHAIN)
    samples = feeds(model, x=(3, 3, 4))
    out, result = check_pass("fold-constants", model, samples)
    assert ops(out) == ["Reshape"]
    np.testing.assert_array_equal(initializer(out, "last"), [4])  # Shape start=-1 honoured
    assert result.counts["shape_values_folded"] == 3


def test_fold_constants_shape_chain_beside_a_large_weight() -> None:
    """Weights over 1 MiB become graph inputs of the shape-inference probe (their
    values are not needed); graphsurgeon 0.6's ``to_variable`` left them without a
    ``type`` and the export failed, so no shape was folded on PP-OCRv4 rec."""
    model = build(SHAPE_CHAIN)
    weight = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "W"))
    model.graph.input.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", 600]))
    model.graph.node.append(helper.make_node("MatMul", ["v", "W"], ["z"]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 600]))
    samples = feeds(model, x=(3, 3, 4), v=(3, 600))
    out, result = check_pass("fold-constants", model, samples)
    assert not [n for n in result.notes if "shape inference failed" in n]
    assert sorted(ops(out)) == ["MatMul", "Reshape"]
    assert result.counts["shape_values_folded"] == 3


def test_fold_constants_shapes_off_is_a_no_op() -> None:
    model = build(SHAPE_CHAIN)
    out, result = apply("fold-constants", model, shapes=False)
    assert not result.changed
    assert ops(out).count("Shape") == 2


def test_fold_constants_keeps_float_arithmetic_on_shapes() -> None:
    # onnx-graphsurgeon's fold_shapes would rewrite this in integers (0.5 -> 0).
    model = build(
        f"""{HEADER}
        g (float[N, 2] x) => (int64[1] y) {{
          s = Shape<end=1>(x)
          f = Cast<to=1>(s)
          h = Constant<value=float[1] {{0.5}}>()
          m = Mul(f, h)
          y = Cast<to=7>(m)
        }}"""
    )
    samples = [{"x": np.ones((3, 2), np.float32)}]
    out, result = apply("fold-constants", onnx.shape_inference.infer_shapes(model))
    assert_lossless(model, out, samples)
    assert run(out, samples)[0]["y"].tolist() == [1]
    assert not result.changed


def test_fold_constants_reports_what_it_cannot_fold() -> None:
    model = build(
        """<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
        g (float[2] x) => (float[2] y) {
          a = Mul(k, k)
          b = my.ops.Frobnicate(a)
          c = Add(b, k)
          d = Sub(k, m)
          e = Add(x, c)
          y = Add(e, d)
        }""",
        k=(2,),
        m=(2,),
    )
    out, result = apply("fold-constants", model)
    assert result.changed
    assert ops(out) == ["Frobnicate", "Add", "Add", "Add"]
    (failure,) = result.skipped
    assert failure.op == "Frobnicate" and "onnxruntime" in failure.reason
    assert "Frobnicate" in failure.reason
    assert result.counts["skipped"] == 1
    assert any("Frobnicate" in note for note in result.notes)
    assert result.details["batch_errors"]
    # Mul and Sub were folded around the failure; the graph is still well-formed.
    onnx.checker.check_model(out)
    _, second = apply("fold-constants", out)
    assert not second.changed and second.counts["skipped"] == 1


def test_fold_constants_string_results_stay_exportable() -> None:
    # graphsurgeon exports numpy constants as raw bytes, which onnx refuses for strings.
    model = build(
        f"""{HEADER}
        g (float[2] x) => (float[2] y, string[1] s) {{
          c = Constant<value=string[1] {{"Yo"}}>()
          s = StringNormalizer<case_change_action="LOWER", locale="C">(c)
          a = Mul(k, k)
          y = Add(x, a)
        }}""",
        k=(2,),
    )
    out, _ = check_pass("fold-constants", model)
    assert ops(out) == ["Add"]
    assert run(out, feeds(out, count=1))[0]["s"].tolist() == ["yo"]


def test_fold_constants_leaves_random_ops() -> None:
    model = build(
        f"""{HEADER}
        g (float[2, 3] x) => (float[2, 3] y) {{
          r = RandomNormal<shape=[2, 3], seed=1.0>()
          y = Add(x, r)
        }}"""
    )
    out, result = apply("fold-constants", model)
    assert not result.changed and ops(out) == ["RandomNormal", "Add"]
    (skip,) = result.skipped
    assert skip.op == "RandomNormal" and "random" in skip.reason


def test_fold_constants_size_threshold() -> None:
    model = build(
        f"""{HEADER}
        g (float[64, 64] x) => (float[64, 64] y) {{
          shape = Constant<value=int64[2] {{64, 64}}>()
          big = Expand(k, shape)
          y = Add(x, big)
        }}""",
        k=(1, 64),
    )
    out, result = apply("fold-constants", model, size_threshold=1024)
    assert not result.changed and "Expand" in ops(out)
    (skip,) = result.skipped
    assert skip.op == "Expand" and "size_threshold" in skip.reason
    out, result = check_pass("fold-constants", model)
    assert ops(out) == ["Add"]


def test_fold_constants_no_op_through_the_manager() -> None:
    (step,) = onnxopt.optimize(MODELS / "digits_mlp.onnx", "fold-constants").steps
    assert step["status"] == "no-op" and step["counts"]["nodes_folded"] == 0


def test_fold_constants_option_validation() -> None:
    with pytest.raises(UsageError, match="size_threshold"):
        Pipeline.parse("fold-constants(size_threshold=-1)")
    with pytest.raises(UsageError, match="valid options: size_threshold, shapes"):
        Pipeline.parse("fold-constants(shape=false)")


# ---------------------------------------------------------------------------- dedupe-initializers

DEDUPE = f"""{HEADER}
g (float[2, 3] x) => (float[2, 3] y) {{
  a = Add(x, w1)
  b = Mul(a, w2)
  c = Sub(b, w3)
  d = Add(c, z1)
  e = Add(d, z2)
  f = Mul(e, s1)
  y = Mul(f, s2)
}}"""


def dedupe_model() -> onnx.ModelProto:
    w = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    return build(
        DEDUPE,
        w1=w,
        w2=w.copy(),
        w3=w + 1.0,  # same shape and dtype, other values: kept apart
        z1=np.zeros(3, np.float32),
        z2=-np.zeros(3, np.float32),  # -0.0 differs in bytes: kept apart
        s1=np.array(2.0, np.float32),
        s2=np.array(2.0, np.float32),
    )


def test_dedupe_initializers() -> None:
    model = dedupe_model()
    out, result = check_pass("dedupe-initializers", model)
    assert sorted(t.name for t in out.graph.initializer) == ["s1", "w1", "w3", "z1", "z2"]
    assert [n.input[1] for n in out.graph.node] == ["w1", "w1", "w3", "z1", "z2", "s1", "s1"]
    assert result.counts["deduplicated"] == 2 and result.counts["bytes_saved"] == 24 + 4
    assert result.details["groups"][0] == {"kept": "w1", "merged": ["w2"], "bytes": 24}


def test_dedupe_initializers_min_size() -> None:
    out, result = apply("dedupe-initializers", dedupe_model(), min_size=2)
    assert result.counts["deduplicated"] == 1
    assert {"s1", "s2"} <= {t.name for t in out.graph.initializer}


def test_dedupe_initializers_keeps_graph_outputs_and_no_op() -> None:
    model = build(
        f"""{HEADER}
        g (float[3] x) => (float[3] y, float[3] k2) {{
          a = Add(x, k1)
          y = Add(a, k2)
        }}""",
        k1=np.ones(3, np.float32),
        k2=np.ones(3, np.float32),
    )
    out, result = apply("dedupe-initializers", model)
    assert not result.changed and len(out.graph.initializer) == 2
    (step,) = onnxopt.optimize(model, "dedupe-initializers").steps
    assert step["status"] == "no-op"


# ---------------------------------------------------------------------------- together


def test_lossless_pipeline_through_the_manager() -> None:
    model = build(
        f"""{HEADER}
        g (float[1, 3, 5, 5] x) => (float[1, 4, 5, 5] y, float[1, 4, 5, 5] z) {{
          scale = Mul(two, two)
          xs = Mul(x, scale)
          c = Conv<pads=[1, 1, 1, 1]>(xs, w1)
          y = BatchNormalization(c, gamma, beta, mean, var)
          z = Conv<pads=[1, 1, 1, 1]>(xs, w2)
        }}""",
        two=np.array(2.0, np.float32),
        w1=np.full((4, 3, 3, 3), 0.1, np.float32),
        w2=np.full((4, 3, 3, 3), 0.1, np.float32),
        **BN_WEIGHTS,
    )
    result = onnxopt.optimize(
        model, "dedupe-initializers,fold-constants,fold-batchnorm,dedupe-initializers"
    )
    assert [s["status"] for s in result.steps] == ["accepted"] * 3 + ["no-op"]
    assert ops(result.model) == ["Mul", "Conv", "Conv"]
    samples = feeds(model)
    assert_equivalent(run(model, samples), run(result.model, samples))


def test_fold_constants_keeps_low_bit_weights_compressed():
    """Cast(uint8 indices) -> Gather(codebook) is a compressed weight: never inflated."""
    indices = np.arange(64, dtype=np.uint8).reshape(8, 8) % 4
    codebook = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["idx"], ["idx32"], to=TensorProto.INT32),
            helper.make_node("Gather", ["codebook", "idx32"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(indices, "idx"), numpy_helper.from_array(codebook, "codebook")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = onnxopt.optimize(model, "fold-constants")
    step = result.steps[0]
    assert step["status"] == "no-op"
    assert any("low-bit" in v["reason"] for v in step["skipped"])
    assert [n.op_type for n in result.model.graph.node] == ["Cast", "Gather", "MatMul"]
