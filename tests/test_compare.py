import math

from hetlora import compare


def test_accuracy_at_fraction_of_rounds():
  accs = [(2, 0.1), (4, 0.3), (6, 0.5), (8, 0.7)]
  assert compare.accuracy_at(accs, 0.25, 8) == 0.1
  assert compare.accuracy_at(accs, 0.5, 8) == 0.3
  assert math.isnan(compare.accuracy_at(accs, 0.1, 8))


def test_row_and_markdown():
  summary = {"rounds": 4, "method": "hetlora", "final_test_accuracy": 0.5, "accuracy_by_round": [(2, 0.25), (4, 0.5)],
             "total_comm_params": 4000, "train_seconds": 12.0}
  r = compare.row("hetlora_alpha0.1", summary)
  assert r["comm_params_per_round"] == 1000 and r["accuracy_at_50pct"] == 0.25
  table = compare.markdown([r])
  assert table.count("\n") == 3 and "| hetlora_alpha0.1 | hetlora | 0.5000 |" in table
