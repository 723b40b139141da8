"""Quality metrics, the accuracy bootstrap and parity against values computed by hand on tiny fixed data.

Every expected value below is worked out in the comment next to it, from the tables in this file, not
from the code under test. ECE uses the code's 15 equal-width bins ([k/15, (k+1)/15)); the confidences
here (0.5, 0.7, 0.85, 0.9) all lie well inside a bin, never on a boundary (multiples of 1/15 such as
0.2, 0.6 or 0.8).
"""

from __future__ import annotations

import math

import pytest
import torch

from patholite.measure.evaluate import bootstrap_accuracy_ci, parity, quality_from_logits
from patholite.measure.metrics import QualityMeter
from patholite.records import QUALITY_KEYS

# --- binary: 8 images, 5 benign (0) and 3 tumor (1); p1 = probability of tumor ------------------------
#  i  label  p1    pred  confidence  correct
#  0    0    0.10   0     0.90        yes
#  1    0    0.10   0     0.90        yes
#  2    0    0.30   0     0.70        yes
#  3    0    0.70   1     0.70        no   (false positive)
#  4    0    0.15   0     0.85        yes
#  5    1    0.90   1     0.90        yes
#  6    1    0.85   1     0.85        yes
#  7    1    0.70   1     0.70        yes
BINARY_P1 = [0.10, 0.10, 0.30, 0.70, 0.15, 0.90, 0.85, 0.70]
BINARY_LABELS = [0, 0, 0, 0, 0, 1, 1, 1]
BINARY_NAMES = ["benign", "tumor"]

# --- three classes: 9 images, 4 / 3 / 2 per class --------------------------------------------------------
#  i  label  (p0,   p1,   p2)    pred  confidence  correct
#  0    0    (0.70, 0.20, 0.10)   0     0.70        yes
#  1    0    (0.90, 0.05, 0.05)   0     0.90        yes
#  2    0    (0.50, 0.30, 0.20)   0     0.50        yes
#  3    0    (0.30, 0.50, 0.20)   1     0.50        no
#  4    1    (0.10, 0.70, 0.20)   1     0.70        yes
#  5    1    (0.20, 0.70, 0.10)   1     0.70        yes
#  6    1    (0.20, 0.10, 0.70)   2     0.70        no
#  7    2    (0.05, 0.05, 0.90)   2     0.90        yes
#  8    2    (0.10, 0.20, 0.70)   2     0.70        yes
THREE_PROBS = [
    [0.70, 0.20, 0.10],
    [0.90, 0.05, 0.05],
    [0.50, 0.30, 0.20],
    [0.30, 0.50, 0.20],
    [0.10, 0.70, 0.20],
    [0.20, 0.70, 0.10],
    [0.20, 0.10, 0.70],
    [0.05, 0.05, 0.90],
    [0.10, 0.20, 0.70],
]
THREE_LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2]
THREE_NAMES = ["stroma", "tumor", "necrosis"]


def binary_probs() -> torch.Tensor:
    p1 = torch.tensor(BINARY_P1)
    return torch.stack([1 - p1, p1], dim=1)


def measure(probs: torch.Tensor, labels: list[int], names: list[str]) -> dict:
    meter = QualityMeter(names)
    meter.update(probs, torch.tensor(labels))
    return meter.compute()


def test_binary_quality_matches_hand_computed_values():
    q = measure(binary_probs(), BINARY_LABELS, BINARY_NAMES)

    # rows = true class, columns = predicted: 4 benign right, 1 benign called tumor; 3 tumors right.
    # The transpose [[4, 0], [1, 3]] would mean "rows = predicted".
    assert q["confusion_matrix"] == [[4, 1], [0, 3]]
    assert q["n_samples"] == 8
    # accuracy = 7 / 8
    assert q["accuracy"] == pytest.approx(7 / 8)
    # recall: benign 4/5, tumor 3/3; balanced accuracy = (4/5 + 1) / 2 = 0.9
    assert q["recall_per_class"] == pytest.approx({"benign": 4 / 5, "tumor": 1.0})
    assert q["balanced_accuracy"] == pytest.approx((4 / 5 + 1) / 2)
    # F1 = 2TP / (2TP + FP + FN): benign 8 / (8 + 0 + 1) = 8/9, tumor 6 / (6 + 1 + 0) = 6/7
    assert q["f1_per_class"] == pytest.approx({"benign": 8 / 9, "tumor": 6 / 7})
    # macro-F1 = (8/9 + 6/7) / 2
    assert q["macro_f1"] == pytest.approx((8 / 9 + 6 / 7) / 2)
    # AUROC = P(score of a tumor > score of a benign), ties count 1/2. 3 x 5 = 15 pairs:
    #   tumor 0.90 beats all 5, tumor 0.85 beats all 5, tumor 0.70 beats 0.10, 0.10, 0.30, 0.15 and ties
    #   the benign 0.70: 5 + 5 + 4.5 = 14.5. The benign class's one-vs-rest AUROC (scores 1 - p1) ranks
    #   the same pairs the other way round, so the macro mean of the two is 14.5 / 15 as well.
    assert q["auroc"] == pytest.approx(14.5 / 15)
    # ECE, 15 bins, weighted by the bin's share of images:
    #   bin [0.667, 0.733): images 2, 3, 7, confidence 0.70, accuracy 2/3 -> |2/3 - 0.7| * 3/8 = 0.1 / 8
    #   bin [0.800, 0.867): images 4, 6,    confidence 0.85, accuracy 1   -> 0.15 * 2/8        = 0.3 / 8
    #   bin [0.867, 0.933): images 0, 1, 5, confidence 0.90, accuracy 1   -> 0.10 * 3/8        = 0.3 / 8
    #   ECE = 0.7 / 8 = 0.0875 (per image without bins it would be 1.9 / 8)
    assert q["ece"] == pytest.approx(0.7 / 8, abs=1e-6)
    assert set(q) == set(QUALITY_KEYS) - {"accuracy_ci95"}


def test_three_class_quality_matches_hand_computed_values():
    q = measure(torch.tensor(THREE_PROBS), THREE_LABELS, THREE_NAMES)

    # rows = true class: stroma 3 right + 1 called tumor; tumor 2 right + 1 called necrosis; necrosis 2 right
    assert q["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [0, 0, 2]]
    assert q["n_samples"] == 9
    # accuracy = 7 / 9
    assert q["accuracy"] == pytest.approx(7 / 9)
    # recall 3/4, 2/3, 2/2; balanced accuracy = (3/4 + 2/3 + 1) / 3
    assert q["recall_per_class"] == pytest.approx({"stroma": 3 / 4, "tumor": 2 / 3, "necrosis": 1.0})
    assert q["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 1) / 3)
    # F1 = 2TP / (2TP + FP + FN): stroma 6/(6+0+1) = 6/7, tumor 4/(4+1+1) = 2/3, necrosis 4/(4+1+0) = 4/5
    assert q["f1_per_class"] == pytest.approx({"stroma": 6 / 7, "tumor": 2 / 3, "necrosis": 4 / 5})
    # macro-F1 = (6/7 + 2/3 + 4/5) / 3
    assert q["macro_f1"] == pytest.approx((6 / 7 + 2 / 3 + 4 / 5) / 3)
    # AUROC one-vs-rest per class, then the unweighted mean (average="macro"):
    #   stroma:   p0 of stroma {.7, .9, .5, .3} all above the rest {.1, .2, .2, .05, .1}        -> 20/20
    #   tumor:    p1 of tumor {.7, .7, .1} vs rest {.2, .05, .3, .5, .05, .2}: 6 + 6 + 2 (beats the two .05)
    #                                                                                          -> 14/18
    #   necrosis: p2 of necrosis {.9, .7} vs rest {.1, .05, .2, .2, .2, .1, .7}: 7 + (6 + 1/2 tie)
    #                                                                                          -> 13.5/14
    assert q["auroc"] == pytest.approx((1 + 14 / 18 + 13.5 / 14) / 3)
    # ECE, 15 bins:
    #   bin [0.467, 0.533): images 2, 3,             confidence 0.5, accuracy 1/2 -> 0
    #   bin [0.667, 0.733): images 0, 4, 5, 6, 8,    confidence 0.7, accuracy 4/5 -> 0.1 * 5/9
    #   bin [0.867, 0.933): images 1, 7,             confidence 0.9, accuracy 1   -> 0.1 * 2/9
    #   ECE = 0.7 / 9
    assert q["ece"] == pytest.approx(0.7 / 9, abs=1e-6)


def test_ece_bins_are_fifteen_wide_slices_of_confidence():
    #  label  p1    pred  confidence  correct   15 bins              (10 bins)
    #    1    0.82   1     0.82        yes      [0.800, 0.867)       [0.8, 0.9)
    #    0    0.88   1     0.88        no       [0.867, 0.933)       [0.8, 0.9)
    #    0    0.45   0     0.55        yes      [0.533, 0.600)       [0.5, 0.6)
    #    1    0.45   0     0.55        no       [0.533, 0.600)       [0.5, 0.6)
    # 15 bins: (|1 - 0.82| + |0 - 0.88| + 2 * |1/2 - 0.55|) / 4 = (0.18 + 0.88 + 0.10) / 4 = 0.29
    # (10 bins would merge the first two: (2 * |1/2 - 0.85| + 0.10) / 4 = 0.2; no bins at all: 2.06 / 4)
    p1 = torch.tensor([0.82, 0.88, 0.45, 0.45])
    q = measure(torch.stack([1 - p1, p1], dim=1), [1, 0, 0, 1], BINARY_NAMES)
    assert q["ece"] == pytest.approx(1.16 / 4, abs=1e-6)
    assert q["accuracy"] == pytest.approx(0.5) and q["confusion_matrix"] == [[1, 1], [1, 1]]


@pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")  # AUROC of absent classes
def test_meter_accumulates_batches_and_resets():
    probs, labels = torch.tensor(THREE_PROBS), torch.tensor(THREE_LABELS)
    meter = QualityMeter(THREE_NAMES)
    meter.update(probs[:4], labels[:4])
    meter.update(probs[4:], labels[4:])
    q = meter.compute()
    # the same numbers as one batch of all 9 images
    assert q["n_samples"] == 9 and q["accuracy"] == pytest.approx(7 / 9)
    assert q["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [0, 0, 2]]

    meter.reset()
    meter.update(probs[:4], labels[:4])  # images 0-3: all stroma, 3 of 4 right
    q = meter.compute()
    assert q["n_samples"] == 4 and q["accuracy"] == pytest.approx(3 / 4)
    assert q["confusion_matrix"] == [[3, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_quality_from_logits_end_to_end():
    # logits = log(p) + a per-image shift: softmax gives back the binary table's probabilities, so every
    # value is the one worked out in test_binary_quality_matches_hand_computed_values. Images 3 and 7 (the
    # AUROC tie at p1 = 0.7) get the same shift, so their softmax stays bit-for-bit equal.
    shift = torch.tensor([[0.0], [3.0], [-2.0], [1.0], [5.0], [0.5], [-1.0], [1.0]])
    logits = torch.log(binary_probs()) + shift
    labels = torch.tensor(BINARY_LABELS)
    q = quality_from_logits(logits, labels, BINARY_NAMES)

    assert set(q) == set(QUALITY_KEYS)
    assert q["confusion_matrix"] == [[4, 1], [0, 3]]
    assert q["n_samples"] == 8
    assert q["accuracy"] == pytest.approx(7 / 8)
    assert q["balanced_accuracy"] == pytest.approx(0.9)
    assert q["macro_f1"] == pytest.approx((8 / 9 + 6 / 7) / 2)
    assert q["auroc"] == pytest.approx(14.5 / 15)
    assert q["ece"] == pytest.approx(0.7 / 8, abs=1e-5)
    assert q["f1_per_class"] == pytest.approx({"benign": 8 / 9, "tumor": 6 / 7})
    assert q["recall_per_class"] == pytest.approx({"benign": 0.8, "tumor": 1.0})
    # the interval is the bootstrap of the top-1 hits (7 of 8) and holds the point accuracy
    low, high = q["accuracy_ci95"]
    assert low <= 7 / 8 <= high and 0 <= low < high <= 1
    assert q["accuracy_ci95"] == bootstrap_accuracy_ci(torch.tensor([True] * 3 + [False] + [True] * 4))


def test_quality_from_logits_softmaxes_logits_inside_zero_one():
    # Logits that already lie in [0, 1] are the trap: torchmetrics would take them as probabilities.
    # softmax([0, 1]) = (1/(1+e), e/(1+e)) = (0.269, 0.731): confidence 0.731, in bin [0.667, 0.733).
    # Image 0 (label 1) is right, image 1 (label 0) wrong: ECE = |1/2 - 0.731| = 0.231.
    # Taken raw, the confidence would be 1.0 and the ECE 0.5.
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    q = quality_from_logits(logits, torch.tensor([1, 0]), BINARY_NAMES)
    e = math.e
    assert q["ece"] == pytest.approx(e / (1 + e) - 0.5, abs=1e-5)
    assert q["accuracy"] == pytest.approx(0.5)
    assert q["confusion_matrix"] == [[0, 1], [0, 1]]


# --- bootstrap_accuracy_ci -----------------------------------------------------------------------------


def hits(n: int, right: int) -> torch.Tensor:
    return torch.tensor([True] * right + [False] * (n - right))


def test_bootstrap_degenerate_cases():
    assert bootstrap_accuracy_ci(hits(10, 10)) == [1.0, 1.0]  # every resample is all right
    assert bootstrap_accuracy_ci(hits(10, 0)) == [0.0, 0.0]  # every resample is all wrong
    assert bootstrap_accuracy_ci(hits(1, 1)) == [1.0, 1.0]
    empty = bootstrap_accuracy_ci(torch.tensor([], dtype=torch.bool))
    assert len(empty) == 2 and all(math.isnan(v) for v in empty)


def test_bootstrap_interval_holds_the_accuracy_and_has_the_binomial_width():
    low, high = bootstrap_accuracy_ci(hits(400, 280))
    assert low < 0.7 < high
    # the resampled accuracy has standard error sqrt(0.7 * 0.3 / 400) = 0.0229, so a 95% interval is about
    # 2 * 1.96 * 0.0229 = 0.090 wide; a 90% one would be 2 * 1.645 * 0.0229 = 0.075 and a 99% one
    # 2 * 2.576 * 0.0229 = 0.118, so a wrong tail (1 - level instead of (1 - level) / 2, say) falls outside
    assert 0.08 < high - low < 0.10
    # and it sits about symmetrically round 0.7 (a binomial at p=0.7, n=400 is close to normal)
    assert abs((0.7 - low) - (high - 0.7)) < 0.02


def test_bootstrap_interval_narrows_as_n_grows():
    small = bootstrap_accuracy_ci(hits(20, 14))  # accuracy 0.7 both times
    large = bootstrap_accuracy_ci(hits(2000, 1400))
    assert small[0] <= 0.7 <= small[1] and large[0] <= 0.7 <= large[1]
    # width shrinks like 1/sqrt(n): 100 times the images, about a tenth of the width
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5


def test_bootstrap_lower_level_lies_inside_higher_level():
    correct = hits(50, 35)
    l50, h50 = bootstrap_accuracy_ci(correct, level=0.5)
    l95, h95 = bootstrap_accuracy_ci(correct, level=0.95)
    assert l95 < l50 <= 0.7 <= h50 < h95


def test_bootstrap_is_deterministic_for_a_seed_and_depends_on_it():
    correct = hits(37, 23)
    assert bootstrap_accuracy_ci(correct, seed=3) == bootstrap_accuracy_ci(correct, seed=3)
    assert bootstrap_accuracy_ci(correct) == bootstrap_accuracy_ci(correct, seed=0)  # the default seed is 0
    # the order of the images does not matter to the distribution, but the seed picks the resamples
    assert len({tuple(bootstrap_accuracy_ci(correct, resamples=200, seed=s)) for s in range(6)}) > 1


# --- parity --------------------------------------------------------------------------------------------


def test_parity_flip_rate_and_largest_logit_difference():
    reference = torch.tensor(
        [
            [2.0, 1.0, 0.0],  # top-1 0
            [0.0, 3.0, 1.0],  # top-1 1
            [1.0, 0.0, 4.0],  # top-1 2
            [5.0, 2.0, 2.0],  # top-1 0
        ]
    )
    logits = torch.tensor(
        [
            [2.5, 1.0, 0.0],  # top-1 0, same;    |diff| max 0.5
            [0.0, 1.0, 1.5],  # top-1 2, flipped; |diff| max |1 - 3| = 2.0
            [1.0, 0.0, 3.0],  # top-1 2, same;    |diff| max 1.0
            [4.0, 2.0, 4.5],  # top-1 2, flipped; |diff| max |2.5|: 4.5 - 2 = 2.5 (and |4 - 5| = 1)
        ]
    )
    p = parity(logits, reference, "fp32")
    # 2 of 4 top-1 predictions changed; the largest difference is 2.5 (a negative -2.0 counts by size)
    assert p == {"against": "fp32", "flip_rate": 0.5, "max_abs_logit_diff": 2.5, "n_samples": 4}
    # symmetric in its two arguments, apart from the name
    assert parity(reference, logits, "x")["max_abs_logit_diff"] == 2.5


def test_parity_of_identical_outputs_and_of_a_sign_only_difference():
    ref = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    assert parity(ref.clone(), ref, "same") == {
        "against": "same",
        "flip_rate": 0.0,
        "max_abs_logit_diff": 0.0,
        "n_samples": 2,
    }
    # negated logits: every top-1 flips; the largest |difference| is |3 - (-3)| = 6
    p = parity(-ref, ref, "neg")
    assert p["flip_rate"] == 1.0 and p["max_abs_logit_diff"] == 6.0


def test_parity_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\) vs reference \(4, 2\)"):
        parity(torch.zeros(4, 3), torch.zeros(4, 2), "fp32")
    with pytest.raises(ValueError):
        parity(torch.zeros(3, 2), torch.zeros(4, 2), "fp32")
