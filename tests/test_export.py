"""export.py on a tiny layer-shared model: exported programs agree with eager PyTorch, layer-shared
blocks share their delegates, the export cache reuses programs, and errors are clear."""
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import export as ex
import xnnpack_lowering as xl
from loader import preset_model
from executorch_private import deserialized_program

pytest.importorskip("executorch.exir")

from conftest import MAX_SEQ_LEN, TINY_LS


def load_method(path):
    from executorch.runtime import Runtime
    return Runtime.get().load_program(Path(path)).load_method("forward")


def eager_steps(model, steps):
    """Last-token logits of model.py's own cached forward for each (tokens, input_pos) step."""
    model.setup_cache(1, MAX_SEQ_LEN)
    with torch.no_grad():
        out = [model(tokens, input_pos=pos)[0][:, -1] for tokens, pos in steps]
    model.clear_cache()
    return out


STEPS = [(torch.tensor([[3, 17, 42, 5, 9]]), torch.arange(5)), (torch.tensor([[11]]), torch.tensor([5])),
         (torch.tensor([[60]]), torch.tensor([6]))]


def test_pte_fp32_matches_eager_and_shares_block_delegates(tiny, pte_fp32):
    path, info = pte_fp32
    method = load_method(path)
    for (tokens, pos), ref in zip(STEPS, eager_steps(tiny, STEPS)):
        out = method.execute([tokens, pos])[0]
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < 1e-4
    # one block applied twice: both applications call its front and back halves, lowered once, and the
    # program holds one delegate per half (+ the head), each called twice
    assert info["delegate_calls"] == 5 and info["delegates"] == info["pieces_lowered"] == 3
    phases = [info[k] for k in ("lower_pieces_s", "torch_export_s", "to_edge_s", "to_executorch_s",
                                "share_and_serialize_s")]
    assert min(phases) >= 0 and sum(phases) <= info["export_s"] + 0.3     # each rounded to 0.1 s
    plan = deserialized_program(Path(path).read_bytes()).execution_plan[0]
    calls = [i.instr_args.delegate_index for chain in plan.chains for i in chain.instructions
             if type(i.instr_args).__name__ == "DelegateCall"]
    assert len(plan.delegates) == 3 and sorted(calls.count(i) for i in set(calls)) == [1, 2, 2]
    V, C = tiny.tok_embeddings.weight.shape
    assert ("FLOAT", (V, C)) in program_constants(Path(path).read_bytes())   # fp32: the exact float table


def test_no_tensor_is_shared_between_block_applications(tiny):
    # the naive lowering's graph: a tensor feeding two delegates makes ExecuTorch duplicate it, re-validating
    # the whole graph each time
    module = ex.ExportLLM(tiny, MAX_SEQ_LEN)
    assert tiny.schedule == [0, 0]                                       # one block, applied twice
    first, second = (front.block for front in module.fronts)
    assert first is tiny.layers[0] and [back.block for back in module.backs] == [first, second]
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b), name  # ...and an equal copy for the repeat
    rotations = [front.rotate_half for front in module.fronts]
    assert rotations[0].data_ptr() != rotations[1].data_ptr() and torch.equal(*rotations)


def test_a_restamped_block_is_the_lowering_of_that_block(dtype="fp32"):
    """Lowering block 0's front half and swapping block 1's weights into it gives what lowering block 1
    gives: the same XNNPACK graph bytes and stored data, and block 1's computation (int8's and 8da4w's
    restamping: test_pte_quantized_close_to_eager). Traced by shape, a lowered half gives its outputs'
    shapes."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule
    from executorch_private import delegates_traced_by_shape, restamped
    model = preset_model(f"{TINY_LS}+n_layers=2+share=none", seed=0)
    halves = [ex.FrontHalf(block, model.config).eval() for block in model.layers]
    seq = torch.export.Dim("seq", min=1, max=MAX_SEQ_LEN - 1)
    example = (torch.randn(1, 3, 32), torch.randn(3, 1, 16), torch.randn(3, 1, 16))
    first, direct = (xl.lower_piece(half, example, ({1: seq}, {0: seq}, {0: seq}), dtype) for half in halves)
    tensors = [xl.stored_tensors(half, dtype) for half in halves]
    stamped = restamped(first, *tensors)
    delegate = lambda piece: next(m for m in piece.children() if isinstance(m, LoweredBackendModule))
    assert delegate(stamped).processed_bytes == delegate(direct).processed_bytes != delegate(first).processed_bytes
    stored = lambda piece: {key: delegate(piece).named_data_store_output.buffers[entry.buffer_index]
                            for key, entry in delegate(piece).named_data_store_output.pte_data.items()}
    assert stored(stamped) == stored(direct) != stored(first)
    longer = (torch.randn(1, 5, 32), torch.randn(5, 1, 16), torch.randn(5, 1, 16))
    real = direct(*longer)                                       # q, k, v: (1, 5, H, D), (1, 5, H_kv, D) x 2
    assert all(torch.equal(a, b) for a, b in zip(stamped(*longer), real))   # the graph runs block 1's tensors
    other = {name: t + 1 if t.is_floating_point() else t for name, t in tensors[0].items()}
    assert restamped(first, other, tensors[1]) is None                  # stored data not found: lower instead
    with delegates_traced_by_shape(stamped):
        shaped = stamped(*longer)
    assert [(t.shape, t.dtype) for t in shaped] == [(t.shape, t.dtype) for t in real] and real[0].shape[1] == 5
    assert all(torch.equal(a, b) for a, b in zip(stamped(*longer), real))   # the real graph again afterwards


def test_greedy_decode_through_exported_cache_equals_generate(tiny, pte_fp32):
    method = load_method(pte_fp32[0])
    prompt = torch.tensor([[1, 2, 3, 4]])
    expected = tiny.generate(prompt, 12, temperature=0)[0, 4:].tolist()
    logits = method.execute([prompt, torch.arange(4)])[0]
    tokens = []
    for pos in range(4, 16):
        tokens.append(int(logits.argmax(-1)))
        logits = method.execute([torch.tensor([[tokens[-1]]]), torch.tensor([pos])])[0]
    assert tokens == expected


def program_constants(data):
    """(dtype name, shape) of every tensor stored in the program itself (outside the delegates)."""
    values = deserialized_program(data).execution_plan[0].values
    return [(v.val.scalar_type.name, tuple(v.val.sizes)) for v in values
            if type(v.val).__name__ == "Tensor" and v.val.data_buffer_idx > 0]


ONE_TOKEN_STEPS = [(tokens[:, i:i + 1], pos[i:i + 1]) for tokens, pos in STEPS for i in range(tokens.size(1))]


@pytest.mark.parametrize("dtype, tolerance, blocks, static_len", [("w8a8", 0.05, "+n_layers=2", None),
                                                                  ("8da4w", 0.15, "+n_layers=2+share=none", 1)])
def test_pte_quantized_close_to_eager(dtype, tolerance, blocks, static_len):
    """W8A8 (per-channel int8 weights) and 8da4w (int4 weights in groups of 32), both with per-token int8
    activations: logits within 5% (int8) / 15% (int4) of their range, and the source model untouched.
    The embedding table outside the delegates is int8 (a float scale per row), not a float copy. Two
    blocks each: the second is restamped from the first (its stored weights made as XNNPACK makes them).
    8da4w's are unshared (sharing is the same code as w8a8's) and run one token at a time (dynamic
    lengths are the same code as fp32's and w8a8's)."""
    tiny = preset_model(TINY_LS + blocks, seed=0)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    data, info = ex.export_pte(tiny, dtype, MAX_SEQ_LEN, static_len=static_len)
    # one delegate per half (front, back) of each block application, + the head; a shared block's two
    # applications run the same two delegates; one block and the head are lowered, the rest restamped
    assert info["delegate_calls"] == 2 * len(tiny.schedule) + 1
    assert info["delegates"] == 2 * tiny.config.n_layers + 1 == 5 and info["pieces_lowered"] == 3
    V, C = tiny.tok_embeddings.weight.shape
    constants = program_constants(data)
    assert ("CHAR", (V, C)) in constants and ("FLOAT", (V, 1)) in constants and ("FLOAT", (V, C)) not in constants
    assert tiny.output.weight is tiny.tok_embeddings.weight                     # still tied
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    from executorch.runtime import Runtime
    method = Runtime.get().load_program(data).load_method("forward")
    steps = ONE_TOKEN_STEPS if static_len else STEPS
    for (tokens, pos), ref in zip(steps, eager_steps(tiny, steps)):
        err = (method.execute([tokens, pos])[0] - ref).abs().max().item()
        assert 0 < err <= tolerance * ref.abs().max().item()      # quantized (not exact), yet close


def test_cached_pte_reuses_the_program_and_says_where_its_time_went(tiny, tmp_path, monkeypatch, capsys):
    calls, info = [], {"delegates": 1, "lower_pieces_s": 2.5, "to_edge_s": 4.0, "export_s": 7.0}
    monkeypatch.setattr(ex, "export_pte", lambda *a: calls.append(a) or (b"program", info))
    first = ex.cached_pte(tiny, "fp32", MAX_SEQ_LEN, cache_dir=tmp_path)
    again = ex.cached_pte(tiny, "fp32", MAX_SEQ_LEN, cache_dir=tmp_path)
    other = ex.cached_pte(tiny, "w8a8", MAX_SEQ_LEN, cache_dir=tmp_path)
    assert first == again != other and len(calls) == 2 and first.read_bytes() == b"program"
    assert capsys.readouterr().out.count("exported in 7.0 s (lower_pieces 2.5 s, to_edge 4.0 s)") == 2


def test_the_export_cache_never_hands_out_a_program_made_for_other_weights_settings_or_options(tmp_path,
                                                                                               monkeypatch):
    """A retrained checkpoint (same shape, new weights) or another norm_eps must get a new program, not the
    stale one; the same model and options get the one already made (0 names the model's context, 64 here)."""
    made = []
    monkeypatch.setattr(ex, "export_pte", lambda *a: made.append(a) or (f"program {len(made)}".encode(),
                                                                         {"export_s": 0}))
    model = preset_model(TINY_LS, seed=0)
    retrained = preset_model(TINY_LS, seed=0)
    with torch.no_grad():
        retrained.layers[0].feed_forward.w2.weight[0, 0] += 1e-3          # one weight of one block
    other_eps = preset_model(TINY_LS + "+norm_eps=1e-6", seed=0)          # the same weights, another computation
    assert all(torch.equal(w, other_eps.state_dict()[k]) for k, w in model.state_dict().items())
    cached = lambda m, seq=MAX_SEQ_LEN, **kw: ex.cached_pte(m, "fp32", seq, cache_dir=tmp_path, **kw)
    first = cached(model)
    assert cached(preset_model(TINY_LS, seed=0)) == first and len(made) == 1      # equal weights: the same program
    others = [cached(retrained), cached(other_eps), cached(model, 16), cached(model, share_blocks=False),
              cached(model, static_len=8)]
    assert len({first, *others}) == 6 and len(made) == 6
    assert [p.read_bytes() for p in (first, *others)] == [f"program {n}".encode() for n in range(1, 7)]
    assert cached(model, 0) == cached(model, 64) != first and len(made) == 7        # block_size 64


def test_a_truncated_or_altered_cached_program_is_exported_again(tmp_path, monkeypatch, capsys):
    """A cached .pte cut short (a full disk, a copy that stopped) or changed since is not handed out: ExecuTorch
    would fail to load it with 'error: 0x:23', or, altered in place, run other weights."""
    made = []
    monkeypatch.setattr(ex, "export_pte", lambda *a: made.append(a) or (b"program " * 100, {"export_s": 0}))
    model = preset_model(TINY_LS, seed=0)
    path = ex.cached_pte(model, "fp32", MAX_SEQ_LEN, cache_dir=tmp_path)
    assert ex.cached_pte(model, "fp32", MAX_SEQ_LEN, cache_dir=tmp_path) == path and len(made) == 1
    damages = [lambda: path.write_bytes(path.read_bytes()[:100]),                   # truncated
               lambda: path.write_bytes(path.read_bytes().replace(b"program", b"PROGRAM", 1)),  # same size, altered
               lambda: path.with_suffix(".json").unlink()]                             # nothing says what it is
    for n, damage in enumerate(damages, start=2):
        damage()
        assert ex.cached_pte(model, "fp32", MAX_SEQ_LEN, cache_dir=tmp_path) == path and len(made) == n
        assert path.read_bytes() == b"program " * 100
    assert capsys.readouterr().out.count("is not the program this cache wrote") == 3


def test_an_unwritable_cache_or_out_folder_is_one_error_before_any_export(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "export_pte", lambda *a: pytest.fail("exported though the program could not be kept"))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(ex.ExportError, match=f"--cache_dir {blocked / 'cache'} cannot be written"):
        ex.cached_pte(preset_model(TINY_LS), "fp32", MAX_SEQ_LEN, cache_dir=blocked / "cache")
    monkeypatch.setattr(ex.os, "access", lambda *a: False)                  # a read-only file system, for root too
    with pytest.raises(SystemExit, match=r"export.py: --out's folder .*phone cannot be written"):
        ex.main(["--init_from", TINY_LS, "--out", str(tmp_path / "phone" / "m.pte"), "--cache_dir", str(tmp_path)])
    assert not (tmp_path / "phone").exists()


def test_ptl_loads_in_lite_interpreter_and_matches(tiny, tmp_path):
    from torch.jit.mobile import _load_for_lite_interpreter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = ex.export_ptl(tiny, tmp_path / "tiny.ptl", MAX_SEQ_LEN)
    assert len([w for w in caught if "optimize_for_mobile" in str(w.message)]) <= 1
    lite = _load_for_lite_interpreter(str(path))
    for (tokens, pos), ref in zip(STEPS, eager_steps(tiny, STEPS)):
        assert (lite(tokens, pos) - ref).abs().max().item() < 1e-5


def test_the_kv_cache_length_defaults_to_the_models_context_up_to_256(tmp_path, capsys):
    short, long = preset_model(TINY_LS), preset_model("mobilellm-micro:block_size=512")
    assert (ex.program_seq_len(short), ex.program_seq_len(long)) == (64, ex.MAX_SEQ_LEN)   # contexts 64 and 512
    assert ex.program_seq_len(short, 32) == 32
    assert ex.export_ptl(short, tmp_path / "default.ptl").is_file()    # the Python API defaults alike
    for bad in (65, -1, 1, 2):                   # 1 and 2: too short for the dynamic token count (not a traceback)
        with pytest.raises(ex.ExportError, match=rf"--max_seq_len \({bad}\) must be in 3..64"):
            ex.program_seq_len(short, bad)
    out = tmp_path / "new" / "folder" / "tiny.ptl"    # no --max_seq_len: a 64-token context needs no flag
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex.main(["--init_from", TINY_LS, "--out", str(out)])                  # .ptl: --format ptl
    assert f"wrote {out}" in capsys.readouterr().out and [p.name for p in out.parent.iterdir()] == ["tiny.ptl"]
    assert zipfile.is_zipfile(out)                                              # TorchScript's archive, not a .pte
    with pytest.raises(SystemExit, match=r"export.py: --max_seq_len \(256\) must be in 3..64"):
        ex.main(["--init_from", TINY_LS, "--format", "ptl", "--max_seq_len", "256", "--out", str(out)])
    with pytest.raises(SystemExit):
        ex.main(["--init_from", TINY_LS, "--format", "pte", "--out", str(out)])
    assert f"--out {out} names a .ptl file, but --format is pte" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ex.main(["--init_from", TINY_LS, "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a directory: give the pte file to write" in capsys.readouterr().err


def test_missing_executorch_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    with pytest.raises(ex.ExportError, match="pip install -r requirements-extra.txt"):
        ex.require_executorch()


def test_executorch_import_and_thread_setting_print_nothing_and_leave_stderr_and_loggers_as_they_were():
    code = ("import logging, sys, export, executorch_private; export.require_executorch(); "
            "executorch_private.reset_threadpool(1); print('still here', file=sys.stderr); "
            "print(logging.getLogger('torchao').level, logging.getLogger('torch.utils._pytree').level)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(ex.__file__).parent)
    assert run.returncode == 0 and run.stderr == "still here\n", run.stderr
    assert run.stdout.split() == ["0", "0"]


def test_int8_checkpoint_gives_its_float_equivalent_weights(tmp_path, capsys):
    from checkpoint import model_checkpoint, save_checkpoint
    from int8 import quantize_model
    float_model = preset_model(TINY_LS, seed=1)
    qmodel = quantize_model(preset_model(TINY_LS, seed=1), "w8a8")
    save_checkpoint(model_checkpoint(qmodel, {"kind": "char", "chars": "ab"}, quantization="w8a8"),
                    tmp_path / "ckpt.pt")
    model = ex.load_source(str(tmp_path))[0]
    assert "holds int8 weights: exported from the float weights they stand for" in capsys.readouterr().out
    assert model.output.weight is model.tok_embeddings.weight                  # still tied, not untied
    w, ref = model.layers[0].feed_forward.w1.weight, float_model.layers[0].feed_forward.w1.weight
    assert 0 < (w - ref).abs().max() <= ref.abs().amax(dim=1).max() / 127      # int8 rounding, no more


def test_command_line_writes_a_program_that_computes_the_model(tiny, pte_fp32, export_cache, tmp_path, capsys):
    out = tmp_path / "phone" / "tiny.pte"                    # a folder that does not exist yet
    ex.main(["--init_from", TINY_LS, "--max_seq_len", str(MAX_SEQ_LEN), "--out", str(out),
             "--cache_dir", str(export_cache)])
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes() == pte_fp32[0].read_bytes()      # the same weights and options: the cached program
    method = load_method(out)
    for (tokens, pos), ref in zip(STEPS, eager_steps(tiny, STEPS)):
        assert (method.execute([tokens, pos])[0] - ref).abs().max().item() < 1e-4
    with pytest.raises(SystemExit, match="export.py: .*no checkpoint at mobilellm-9t:n_layers=1"):
        ex.main(["--init_from", "mobilellm-9t:n_layers=1", "--cache_dir", str(tmp_path / "cache")])


def test_idle_xnnpack_passes_are_skipped_only_where_their_ops_are_missing(monkeypatch):
    from types import SimpleNamespace
    from executorch.backends.xnnpack._passes import (Conv1dUnsqueezePass, ConvertToLinearPass, ConvertToSDPAPass,
                                                     XNNPACKPassManager)
    from executorch_private import XNNPACK_PASS_OPS, xnnpack_skip_idle_passes
    assert set(XNNPACK_PASS_OPS) < {p.__name__ for p in XNNPACKPassManager(None).passes}   # none renamed
    record = lambda self: [p.__name__ for p in self.passes]                                 # instead of running them
    monkeypatch.setattr(XNNPACKPassManager, "transform", record)

    def manager(*ops):
        nodes = [SimpleNamespace(op="call_function", target=SimpleNamespace(__name__=op)) for op in ops]
        return SimpleNamespace(exported_program=SimpleNamespace(graph=SimpleNamespace(nodes=nodes)),
                               passes=[ConvertToLinearPass, Conv1dUnsqueezePass, ConvertToSDPAPass])

    with xnnpack_skip_idle_passes():
        assert XNNPACKPassManager.transform(manager("aten.mm.default")) == ["ConvertToLinearPass"]
        assert XNNPACKPassManager.transform(manager("aten.convolution.default", "aten._softmax.default")) == [
            "ConvertToLinearPass", "Conv1dUnsqueezePass", "ConvertToSDPAPass"]
    assert XNNPACKPassManager.transform is record                                           # restored


def test_cia_operators_are_listed_once_inside_a_lowering():
    import torch.export.decomp_utils as decomp_utils
    import torch.export.exported_program as exported_program
    from executorch_private import cia_ops_collected_once
    original = exported_program._collect_all_valid_cia_ops
    with cia_ops_collected_once():
        first = exported_program._collect_all_valid_cia_ops()
        assert decomp_utils._collect_all_valid_cia_ops() is first and len(first) > 100
    assert exported_program._collect_all_valid_cia_ops is original is decomp_utils._collect_all_valid_cia_ops
