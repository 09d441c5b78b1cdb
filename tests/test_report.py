"""Site records: locations from FX stack traces, the table, the registry."""
import threading

import pytest
import sympy

import attn_compiler
from attn_compiler.report import Report, Site, location_from_stack_trace, record

TRACE = '''File "/home/u/proj/train.py", line 90, in <module>
    loss = model(x).sum()
  File "/usr/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1775, in _call_impl
    return forward_call(*args, **kwargs)
  File "/home/u/proj/model.py", line 42, in forward
    att = q @ k.transpose(-2, -1)
  File "/usr/lib/python3.11/site-packages/torch/_tensor.py", line 40, in wrapped
    return f(*args, **kwargs)
'''


def test_location_picks_innermost_user_frame():
    assert location_from_stack_trace(TRACE) == "model.py:42 in forward"


def test_location_unknown():
    assert location_from_stack_trace(None) == "<unknown>"
    assert location_from_stack_trace("") == "<unknown>"
    only_torch = 'File "/x/site-packages/torch/nn/functional.py", line 3, in softmax\n'
    assert location_from_stack_trace(only_torch) == "<unknown>"


def test_location_skips_package_but_not_shipped_models():
    trace = ('File "/r/attn_compiler/models/gpt.py", line 57, in forward\n'
             'File "/r/attn_compiler/backend.py", line 10, in run\n')
    assert location_from_stack_trace(trace) == "gpt.py:57 in forward"


def test_location_windows_paths_and_missing_function():
    trace = 'File "C:\\work\\torch\\x.py", line 1, in f\nFile "C:\\work\\m.py", line 7\n'
    assert location_from_stack_trace(trace) == "m.py:7"


def _fused_site(**features):
    return Site("fused", location="model.py:42 in forward", features=features, graph_id=0)


def test_table_has_columns_and_rows():
    record(_fused_site(scale=0.125, mask="q_idx >= kv_idx", gqa_group=4, dropout=0.1,
                       dtypes=("torch.bfloat16",) * 3,
                       shapes={"q": (2, 8, 128, 64), "k": (2, 2, 128, 64)}))
    record(Site("declined", reason="softmax over dim 1", graph_id=0, ordinal=1))
    text = str(attn_compiler.report())
    for column in ("status", "location", "mask", "score mod", "scale", "GQA",
                   "dropout", "dtypes", "shapes", "reason"):
        assert column in text
    assert "2 attention sites: 1 fused, 1 declined" in text
    assert "model.py:42 in forward" in text and "softmax over dim 1" in text
    assert "q 2x8x128x64" in text and "bf16" in text and "0.125" in text


def test_long_expressions_are_shortened():
    expr = sympy.sympify("+".join(f"t{i}(b, h, q_idx, kv_idx)" for i in range(12)))
    record(_fused_site(score_mod=expr))
    longest = max(len(line) for line in str(attn_compiler.report()).splitlines())
    assert longest < len(str(expr)) + 60
    assert "..." in str(attn_compiler.report())


def test_long_reasons_are_wrapped():
    record(Site("declined", reason="the attention probabilities are also returned " * 4))
    lines = str(attn_compiler.report()).splitlines()
    assert len(lines) > 4  # title, header, rule, and a reason over several lines


def test_fused_declined_and_dicts():
    record(_fused_site(score_mod=sympy.Symbol("score") / 8))
    record(Site("declined", reason="why"))
    r = attn_compiler.report()
    assert isinstance(r, Report) and len(r) == 2
    assert [s.status for s in r.fused] == ["fused"] and r.declined[0].reason == "why"
    d = r.to_dicts()
    assert d[0]["features"]["score_mod"] == "score/8" and d[1]["status"] == "declined"


def test_reset_and_empty_report():
    record(Site("declined", reason="x"))
    attn_compiler.reset()
    assert len(attn_compiler.report()) == 0
    assert "no attention sites" in str(attn_compiler.report())


def test_bad_status_rejected():
    with pytest.raises(ValueError, match="status"):
        Site("maybe")


def test_record_is_thread_safe():
    def many():
        for _ in range(200):
            record(Site("declined", reason="t"))

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(attn_compiler.report()) == 800


def test_a_virtual_environment_under_a_torch_folder_is_not_library_code():
    trace = ('File "/opt/torch/.venv/lib/python3.12/site-packages/transformers/models/bart/'
             'modeling_bart.py", line 250, in forward\n'
             'File "/opt/torch/.venv/lib/python3.12/site-packages/torch/nn/functional.py", '
             'line 3, in softmax\n')
    assert location_from_stack_trace(trace) == "modeling_bart.py:250 in forward"
