"""The simulator's inputs: traces (Azure CSV, Mooncake JSONL) with their errors named
by line and field, scaling, the step-time model's features, file and fit."""

from __future__ import annotations

import json
import random

import pytest

from cluster.sim.step_time import COEFFICIENTS, BatchShape, StepTimeModel, batch_shape, fit
from cluster.sim.trace import TraceRequest, TraceScale, read_trace


def write(path, text: str):
    path.write_text(text)
    return path


def test_an_azure_csv_trace_reads_in_arrival_order_and_scales(tmp_path):
    path = write(tmp_path / "t.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n"
                                     "0.0,374,44\n4.5,396,109\n\n2.0,91,16\n")
    trace = read_trace(path)
    assert [(r.index, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace] == \
           [(0, 0.0, 374, 44), (2, 2.0, 91, 16), (1, 4.5, 396, 109)]
    scaled = read_trace(path, TraceScale(time_scale=2.0, length_divisor=4, max_prompt_tokens=90, limit=2))
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in scaled] == [(0.0, 90, 11), (2.25, 90, 27)]


@pytest.mark.parametrize("body, message", [
    ("arrived_at,num_prefill_tokens\n0,1\n", r"line 1: the header must be arrived_at,num_prefill_tokens,"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n1,ten,5\n", r"t.csv line 3: num_prefill_tokens "
                                                                            r"must be an integer >= 1, got 'ten'"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n-1,10,5\n", r"line 2: arrived_at must be a finite number "
                                                                     r">= 0, got '-1'"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,0\n", r"line 2: num_decode_tokens must be an integer"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10\n", r"line 2: 3 fields expected, got 2"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n", r"the trace holds no request"),
])
def test_a_malformed_csv_trace_is_refused_naming_the_line_and_the_field(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        read_trace(write(tmp_path / "t.csv", body))


def test_mooncake_requests_with_the_same_hash_ids_share_their_prompt_tokens(tmp_path):
    lines = [{"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [7, 8, 9]},
             {"timestamp": 1500, "input_length": 700, "output_length": 5, "hash_ids": [7, 3]},
             {"timestamp": 2000, "input_length": 20, "output_length": 5}]
    path = write(tmp_path / "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    a, b, c = read_trace(path)
    assert (b.arrival_s, c.arrival_s) == (1.5, 2.0)
    pa, pb, pc = a.prompt_token_ids(), b.prompt_token_ids(), c.prompt_token_ids()
    assert (len(pa), len(pb), len(pc)) == (1100, 700, 20)
    assert pa[:512] == pb[:512] and pa[512] != pb[512]  # block 7 shared, then 8 vs 3
    assert not set(pc) & (set(pa) | set(pb))  # no hash ids: its own tokens
    halved = read_trace(path, TraceScale(length_divisor=2))[0]
    assert halved.hash_block_tokens == 256 and halved.prompt_token_ids()[:256] == read_trace(
        path, TraceScale(length_divisor=2))[1].prompt_token_ids()[:256]


@pytest.mark.parametrize("line, message", [
    ('{"timestamp": 0, "input_length": 10}', r"m.jsonl line 2: field 'output_length' is missing"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1, 2]}',
     r"line 2: hash_ids has 2 ids, but input_length 10 fills only 1 blocks of 512 tokens"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": ["a"]}', r"line 2: hash_ids must be"),
    ('{"timestamp": 0, "input_length": 10.5, "output_length": 5}', r"line 2: input_length must be an integer"),
    ('[1, 2]', r"line 2: a JSON object expected, got list"),
    ('{"timestamp": 0,', r"line 2: not JSON"),
])
def test_a_malformed_mooncake_line_is_refused_naming_the_line_and_the_field(tmp_path, line, message):
    good = '{"timestamp": 0, "input_length": 10, "output_length": 5}'
    with pytest.raises(ValueError, match=message):
        read_trace(write(tmp_path / "m.jsonl", good + "\n" + line + "\n"))


def test_a_trace_of_another_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"a trace is .csv .* or .jsonl \(Mooncake\), got '.txt'"):
        read_trace(write(tmp_path / "t.txt", ""))


def test_a_batch_shape_counts_prefill_pairs_and_decode_context():
    # a prompt chunk of 4 after 10 computed: 4*10 + 4*5/2 pairs; two decodes at 7 and 20 computed
    assert batch_shape([(10, 4), (7, 1), (20, 1), (0, 3)]) == BatchShape(7, 50 + 6, 2, 8 + 21)
    assert TraceRequest(3, 0.0, 4, 1).prompt_token_ids() == [3 << 24, (3 << 24) + 1, (3 << 24) + 2, (3 << 24) + 3]


def test_the_fit_recovers_known_coefficients_from_synthetic_timings():
    truth = (0.004, 3e-5, 2e-9, 1.5e-4, 4e-7)
    rng = random.Random(1)
    samples = []
    for _ in range(40):
        chunks = [(rng.choice((0, 64)), rng.randrange(2, 600)) for _ in range(rng.randrange(0, 4))]
        chunks += [(rng.randrange(1, 3000), 1) for _ in range(rng.randrange(0, 40))]
        shape = batch_shape(chunks)
        samples.append((shape, sum(c * f for c, f in zip(truth, shape.features()))))
    assert fit(samples) == pytest.approx(truth, rel=1e-6)


def test_the_fit_says_which_term_no_sample_exercises():
    samples = [(batch_shape([(0, n)]), 0.01 + n * 1e-5) for n in (10, 20, 40, 80, 160, 320)]
    with pytest.raises(ValueError, match=r"never exercise \['decode_seq_s', 'decode_context_s'\]"):
        fit(samples)


def test_a_step_time_model_round_trips_its_file_and_names_a_bad_field(tmp_path):
    model = StepTimeModel(0.004, 3e-5, 2e-9, 1.5e-4, 4e-7, model="m", kv_block_bytes=65536,
                          max_position_embeddings=2048, transfer_bytes_per_s=5e8)
    model.save(tmp_path / "m.json")
    assert StepTimeModel.load(tmp_path / "m.json") == model
    assert model.step_s(BatchShape(0, 0, 2, 100)) == pytest.approx(0.004 + 3e-4 + 4e-5)
    assert model.transfer_s(10) == pytest.approx(0.001 + 10 * 65536 / 5e8)
    raw = json.loads((tmp_path / "m.json").read_text())
    write(tmp_path / "bad.json", json.dumps({**raw, "speed": 3}))
    with pytest.raises(ValueError, match=r"unknown fields \['speed'\], missing \[\]"):
        StepTimeModel.load(tmp_path / "bad.json")
    write(tmp_path / "bad.json", json.dumps({**raw, "kv_block_bytes": 0}))
    with pytest.raises(ValueError, match=r"kv_block_bytes must be an integer >= 1, got 0"):
        StepTimeModel.load(tmp_path / "bad.json")
    assert set(COEFFICIENTS) <= set(raw)
