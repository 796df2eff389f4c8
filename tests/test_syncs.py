"""syncs.py: the counter finds each kind of host sync, says whose code asked for it, and places it in its layer."""

from __future__ import annotations

import copy
import types
from traceback import FrameSummary

import torch
from boson_multimodal.model.higgs_audio import modeling_higgs_audio

import collate
import model_utils
import syncs
import trainable


def test_each_kind_of_host_sync_is_counted_and_plain_work_is_not():
    x = torch.randn(6, 4)
    mask = x[:, 0] > 0
    with syncs.SyncCounter() as counter:
        (x * 2 + 1).sum(dim=0).softmax(-1)
        float(x.sum())
        x.nonzero()
        x[mask]
        torch.equal(x, x)
        x[mask] = 0.0
        torch.masked_select(x, mask[:, None])
    assert [sync.operator for sync in counter.syncs] == [
        "item", "nonzero", "index with a boolean mask", "equal", "index_put_ with a boolean mask", "masked_select"]
    assert {sync.owner for sync in counter.syncs} == {syncs.OURS}, "this file is ours"
    assert all(sync.where.startswith("test_syncs.py:") and sync.layer is None for sync in counter.syncs)


def test_copies_wait_from_pageable_memory_or_to_the_host_but_not_from_pinned_memory_without_blocking():
    def tensor(device: str, pinned: bool = False):
        return types.SimpleNamespace(device=torch.device(device), is_pinned=lambda: pinned)

    copy_ = torch.ops.aten.copy_.default
    to_copy = torch.ops.aten._to_copy.default
    assert syncs._sync_operator(copy_, (tensor("cpu"), tensor("cuda")), {}) == "device-to-host copy"
    assert syncs._sync_operator(to_copy, (tensor("cpu"),), {"device": torch.device("cuda")}) == "waiting host-to-device copy"
    assert syncs._sync_operator(to_copy, (tensor("cpu", pinned=True),), {"device": torch.device("cuda")}) == "waiting host-to-device copy"
    assert syncs._sync_operator(to_copy, (tensor("cpu", pinned=True),), {"device": torch.device("cuda"), "non_blocking": True}) is None
    assert syncs._sync_operator(to_copy, (tensor("cpu"),), {"device": torch.device("cpu")}) is None


def test_the_package_s_syncs_are_its_own_and_placed_in_their_layers_forward_and_backward(tiny, batches):
    model = copy.deepcopy(tiny.model).train()
    inputs = collate.batch_to_model_inputs(batches[1], "cpu")
    with syncs.SyncCounter(model) as counter:
        loss = model_utils.compute_loss(model(**inputs), inputs["label_audio_ids"])
        loss.total.backward()
    summary = counter.summary()
    assert summary[syncs.OURS] == 0 and summary[syncs.PACKAGE] == len(counter.syncs) > 0
    per_layer = [summary["by_layer"][f"layer {index}"] for index in range(len(model.layers))]
    assert per_layer[0] == per_layer[1] and per_layer[0][syncs.PACKAGE] > 0, summary["by_layer"]
    phases = {sync.phase for sync in counter.syncs if sync.layer == 0}
    assert phases == {"forward", "backward"}
    assert any("modeling_higgs_audio.py" in sync.where for sync in counter.syncs if sync.phase == "backward")


def test_a_package_function_our_code_calls_itself_is_ours(tiny, batches):
    """Running the package's merge from our code (as `--debug-checks` does) is our sync, not the package's."""
    inputs = collate.batch_to_model_inputs(batches[1], "cpu")
    with syncs.SyncCounter() as counter:
        trainable.merged_text_labels(tiny.model, inputs)
    assert counter.syncs and {sync.owner for sync in counter.syncs} == {syncs.OURS}
    assert all("merge_input_ids_with_audio_features" in sync.where for sync in counter.syncs)


def test_torch_reached_through_a_symbolic_link_is_torch(tmp_path):
    """A checkout whose virtual environment is a symbolic link to one elsewhere runs torch's files by the link's
    path, while `TORCH_DIR` is resolved: torch's frames are still torch's, so the package's sync under torch's
    module call is the package's, and the frames inside the autograd engine start after its entry."""
    linked = tmp_path / "venv-torch"
    linked.symlink_to(syncs.TORCH_DIR, target_is_directory=True)
    ours = FrameSummary(__file__, 1, "test", lookup_line=False)
    module_call = FrameSummary(str(linked / "nn" / "modules" / "module.py"), 1, "_call_impl", lookup_line=False)
    layer = FrameSummary(modeling_higgs_audio.__file__, 699, "forward", lookup_line=False)
    read = FrameSummary(str(linked / "_tensor.py"), 1, "__bool__", lookup_line=False)
    assert syncs._owner([ours, module_call, layer, read]) == (syncs.PACKAGE, "modeling_higgs_audio.py:699 forward")
    engine = FrameSummary(str(linked / "autograd" / "graph.py"), 1, "_engine_run_backward", lookup_line=False)
    assert syncs._python_inside_engine([ours, engine, module_call, layer, read]) == [module_call, layer, read]
