import pytest

from tuneloop.batching import EpochBatchSampler, plan_epoch

LENGTHS = [(i * 37) % 101 + 1 for i in range(1003)]


@pytest.mark.parametrize("grouped", [False, True])
def test_every_example_exactly_once_per_epoch(grouped):
    for epoch in range(3):
        plan = plan_epoch(LENGTHS, 8, seed=0, epoch=epoch, group_by_length=grouped)
        flat = [i for b in plan for i in b]
        assert sorted(flat) == list(range(len(LENGTHS)))
        assert len(plan) == -(-len(LENGTHS) // 8)


@pytest.mark.parametrize("grouped", [False, True])
def test_order_differs_per_epoch_and_seed_but_is_reproducible(grouped):
    a = plan_epoch(LENGTHS, 8, seed=0, epoch=0, group_by_length=grouped)
    assert a == plan_epoch(LENGTHS, 8, seed=0, epoch=0, group_by_length=grouped)
    assert a != plan_epoch(LENGTHS, 8, seed=0, epoch=1, group_by_length=grouped)
    assert a != plan_epoch(LENGTHS, 8, seed=1, epoch=0, group_by_length=grouped)


def test_grouping_cuts_padding():
    from tuneloop.preview import padding_share

    assert padding_share(LENGTHS, 8, 0, True) < padding_share(LENGTHS, 8, 0, False) / 5


def test_shards_cover_the_plan_with_equal_step_counts():
    samplers = [EpochBatchSampler(LENGTHS, 8, seed=3, num_processes=3, process_index=p) for p in range(3)]
    for s in samplers:
        s.select_epoch(1)
    local = [list(s) for s in samplers]
    assert len({len(batches) for batches in local}) == 1 and len(local[0]) == len(samplers[0])
    seen = [i for batches in local for b in batches for i in b]
    assert set(seen) == set(range(len(LENGTHS)))  # padding repeats a few batches, drops none


def test_start_skips_exactly_the_consumed_batches():
    s = EpochBatchSampler(LENGTHS, 8, seed=0)
    s.select_epoch(2)
    full = list(s)
    s.select_epoch(2, start=17)
    assert list(s) == full[17:]


def test_window_sizes_count_every_example_of_each_optimizer_step():
    s = EpochBatchSampler(list(range(21)), 4, seed=0, accumulation_steps=4)  # batches 4,4,4,4 | 4,1
    assert s.window_sizes() == [16, 5]  # the short last window holds 5 examples
    assert [len(b) for b in s.local_plan()] == [4, 4, 4, 4, 4, 1] and len(s) == 6
    two = EpochBatchSampler(list(range(21)), 4, seed=0, num_processes=2)
    assert two.window_sizes() == [8, 8, 5]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("processes, batch, accumulation", [(2, 4, 1), (2, 2, 2), (4, 1, 2), (1, 2, 4)])
def test_each_optimizer_step_takes_the_same_examples_however_it_is_split(grouped, processes, batch, accumulation):
    lengths = LENGTHS[:203]  # 203 = 25 x 8 + 3: a short last step
    one = EpochBatchSampler(lengths, 8, seed=5, group_by_length=grouped)
    shards = [EpochBatchSampler(lengths, batch, seed=5, group_by_length=grouped, num_processes=processes,
                                process_index=p, accumulation_steps=accumulation) for p in range(processes)]
    for s in (one, *shards):
        s.select_epoch(1)
    assert len({len(s) for s in shards}) == 1 and all(len(list(s)) == len(s) for s in shards)
    steps = -(-len(shards[0]) // accumulation)
    assert steps == len(one) == 26 and shards[0].window_sizes() == one.window_sizes()
    for step, window in enumerate(one.local_plan()):
        taken = []
        for s in shards:
            micro = slice(step * accumulation, (step + 1) * accumulation)
            for b, n in zip(s.local_plan()[micro], s.local_sizes()[micro]):
                assert len(b) == max(n, 1) and len(b) <= batch
                taken += b[:n]
        assert sorted(taken) == sorted(window)  # every example once, no padding duplicates


def test_a_short_last_batch_gives_a_zero_weight_filler_to_processes_without_examples():
    shards = [EpochBatchSampler(list(range(17)), 4, seed=0, num_processes=2, process_index=p) for p in range(2)]
    assert [s.local_sizes() for s in shards] == [[4, 4, 1], [4, 4, 0]]
    assert len(shards[1].local_plan()[-1]) == 1  # a real example, so the forward pass has a shape; weight 0
    assert shards[0].window_sizes() == [8, 8, 1]


def test_grouped_plan_keeps_the_short_batch_last():
    for epoch in range(4):
        plan = plan_epoch(LENGTHS, 8, seed=0, epoch=epoch, group_by_length=True)
        assert [len(b) for b in plan[:-1]] == [8] * (len(plan) - 1) and len(plan[-1]) == len(LENGTHS) % 8
