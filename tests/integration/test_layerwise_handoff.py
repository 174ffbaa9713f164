"""A prefill→decode handoff streams the prompt's KV layer by layer, between two
engines in one process: each forward's blocks are read while later layers of that
same forward still compute, and the destination continues exactly.

A gate holds the forward before one layer, so what was read mid-forward is known
exactly, not timed. The destination holds other requests' blocks first, so its block
ids differ from the source's."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.integration.test_migration_engine import Run, assert_no_leak, busy_destination, prompt, undisturbed
from workers import SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.layer_progress import ForwardFailed, LayerProgress
from workers.kv_transport import InProcessTransport

TRANSPORT = InProcessTransport()
BLOCK = 8
CHUNK = 24  # three blocks a forward
PARAMS = SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True)
WAIT_S = 30.0


@pytest.fixture(scope="module")
def config(make_model):
    return EngineConfig(model=str(make_model("tiny-llama")), kv_cache_memory_gib=0.25, block_size=BLOCK,
                        max_num_batched_tokens=CHUNK)


class Gate:
    """Holds the source's forward before `layer` until opened; says when it got there."""

    def __init__(self, engine: LLMEngine, layer: int) -> None:
        self.reached, self.open = threading.Event(), threading.Event()
        self.handle = engine.runner.model.layers[layer].register_forward_pre_hook(self._hold)

    def _hold(self, module, args) -> None:
        self.reached.set()
        assert self.open.wait(WAIT_S), "the test never opened the gate"

    def close(self) -> None:
        self.handle.remove()


class LayerSender:
    """Sends one stage's layers to the destination as the source's forward does them."""

    def __init__(self, source: LLMEngine, dest: LLMEngine, mid: str, step) -> None:
        self.source, self.dest, self.mid, self.step = source, dest, mid, step
        self.sent = 0

    def send(self, upto: int) -> int:
        """Layers [sent, upto or more), once the forward has done them; returns how many are sent."""
        stage, forward_id = self.step.stage, self.step.forward_id
        done = self.source.wait_layers(forward_id, upto, WAIT_S)
        payload = TRANSPORT.send(self.source, stage.block_ids, (self.sent, done), forward_id)
        self.dest.grow_reservation(self.mid, (stage.first_block + len(stage.block_ids)) * BLOCK)
        TRANSPORT.receive(self.dest, self.mid, stage.first_block, payload)
        self.sent = done
        return done


def assert_same_kv(source: LLMEngine, source_ids, dest: LLMEngine, dest_ids, layers: range) -> None:
    assert list(dest_ids) != list(source_ids)
    for layer in layers:
        got = dest.runner.kv_caches[layer, :, list(dest_ids)]
        want = source.runner.kv_caches[layer, :, list(source_ids)]
        assert torch.equal(got, want), f"layer {layer} differs"


def stream_prompt(source: LLMEngine, dest: LLMEngine, mid: str, rid: str, run: Run) -> list:
    """Step the source through its prompt, streaming each forward's blocks with the
    forward held before its last layer: the first layers are read and written at the
    destination while that forward has not finished. Returns the stages."""
    last = source.model_config.num_layers - 1
    stages = []
    while True:
        rounds = []
        gate = Gate(source, last)
        stepping = threading.Thread(target=lambda: run.take(
            source.step(lambda: rounds.append(source.stream_migration(mid))), rid))
        stepping.start()
        try:
            assert gate.reached.wait(WAIT_S)
            step = rounds[0]
            assert step.in_prefill and step.forward_id is not None, step
            sender = LayerSender(source, dest, mid, step)
            # Held before its last layer, the forward has done exactly the others.
            assert sender.send(1) == last
            assert stepping.is_alive() and not run.tokens
            dest_ids = dest.destination._by_id[mid].block_ids
            assert_same_kv(source, step.stage.block_ids, dest,
                           dest_ids[step.stage.first_block:step.stage.first_block + len(step.stage.block_ids)],
                           range(last))
        finally:
            gate.open.set()
            gate.close()
        stepping.join(WAIT_S)
        assert sender.send(last + 1) == last + 1
        stages.append(step)
        if step.final_prefill:
            return stages


def streamed(config: EngineConfig, length: int, rid: str, mid: str) -> tuple[Run, LLMEngine, LLMEngine, Run, list]:
    """A prompt of `length` tokens streamed from a source to a busy destination up to
    its first token; returns the undisturbed run, both engines, the run so far and the
    stages."""
    tokens = prompt(length, length)
    want = undisturbed(config, tokens, PARAMS)
    source, dest = LLMEngine(config), busy_destination(config)
    source.add_request(rid, tokens, PARAMS)
    run = Run()
    dest.reserve_migration(mid, rid, source.start_migration(mid, rid))
    return want, source, dest, run, stream_prompt(source, dest, mid, rid, run)


@pytest.mark.parametrize("length", [3 * CHUNK, 3 * CHUNK + 5], ids=["whole-blocks", "part-full-last-block"])
def test_each_forward_streams_its_blocks_layer_by_layer_and_the_output_is_exact(config, length):
    rid, mid = "streamed", "h1"
    want, source, dest, run, stages = streamed(config, length, rid, mid)
    assert len(stages) == -(-length // CHUNK)
    # Every block of the prompt went out, the part-full last one with the last forward.
    sent = [b for s in stages for b in s.stage.block_ids]
    assert sent == source.requests[rid].seq.block_ids and len(sent) == -(-length // BLOCK)
    assert len(run.tokens) == 1  # the first token, from the last streamed forward
    pause = source.advance_migration(mid, 1 << 30, "stream")
    assert pause.paused and pause.stage.block_ids == (), pause  # nothing left to copy
    dest_ids = dest.destination._by_id[mid].block_ids[:len(sent)]
    assert_same_kv(source, sent, dest, dest_ids, range(source.model_config.num_layers))
    dest.commit_migration(mid, pause.state)
    assert source.complete_migration(mid) == 1
    assert_no_leak(source)
    assert source.blocks.num_free_blocks == source.blocks.num_blocks
    while rid in dest.requests:
        run.take(dest.step(), rid)
    assert run.tokens == want.tokens and run.logprobs == want.logprobs


def test_a_part_full_block_goes_again_if_the_request_decoded_before_the_pause(config):
    rid, mid = "decoded-first", "h2"
    want, source, dest, run, stages = streamed(config, 2 * CHUNK + 5, rid, mid)
    run.take(source.step(), rid)  # the pause comes late: one decode step writes the last block
    assert len(run.tokens) == 2
    pause = source.advance_migration(mid, 1 << 30, "stream")
    seq = source.requests[rid].seq
    assert pause.paused and pause.stage.block_ids == (seq.block_ids[-1],) == (stages[-1].stage.block_ids[-1],)
    dest.grow_reservation(mid, len(seq.block_ids) * BLOCK)
    TRANSPORT.receive(dest, mid, pause.stage.first_block, TRANSPORT.send(source, pause.stage.block_ids))
    dest.commit_migration(mid, pause.state)
    assert source.complete_migration(mid) == 2
    assert source.blocks.num_free_blocks == source.blocks.num_blocks
    while rid in dest.requests:
        run.take(dest.step(), rid)
    assert run.tokens == want.tokens


def test_a_round_outside_a_forward_takes_computed_blocks_only(config):
    source = LLMEngine(config)
    source.add_request("r", prompt(1, 2 * CHUNK + 3), PARAMS)
    source.start_migration("m", "r")
    first = source.stream_migration("m")  # between steps: nothing computed yet
    assert (first.stage.block_ids, first.forward_id, first.final_prefill, first.in_prefill) == ((), None, False, True)
    source.step()  # one chunk, three full blocks, and no round taken during it
    later = source.stream_migration("m")
    assert later.stage.block_ids == tuple(source.requests["r"].seq.block_ids[:3]) and later.forward_id is None


def test_layer_progress_waits_for_the_layer_and_fails_with_its_forward():
    progress = LayerProgress(num_layers=4)
    progress.begin(7)
    progress.layer_done(0)
    assert progress.wait(7, 1, WAIT_S) == 1
    with pytest.raises(TimeoutError, match="layer 2 of forward 7"):
        progress.wait(7, 2, 0.01)
    assert progress.wait(6, 4, 0.01) == 4  # an earlier forward is over
    progress.end(7, ok=False)
    with pytest.raises(ForwardFailed):
        progress.wait(7, 4, WAIT_S)
    progress.begin(8)
    waiter = threading.Thread(target=lambda: results.append(progress.wait(8, 3, WAIT_S)))
    results: list[int] = []
    waiter.start()
    progress.layer_done(0)
    progress.layer_done(1)
    progress.layer_done(2)
    waiter.join(WAIT_S)
    assert results == [3]
