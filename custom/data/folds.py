"""Patient-grouped cross-validation folds balanced by lesion volume.

MONAI's ``partition_dataset`` splits items at random or by class but cannot keep a patient's slabs
(ISLES 2018 cases A and B) in one fold nor balance lesion volume across folds; this module does both.
"""

import random


def validate_fold_count(num_patients: int, num_folds: int):
    """Refuse a fold count that is not an integer of at least 2, or that exceeds the number of patients."""
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"folds must be an integer of at least 2, got {num_folds!r}")
    if num_patients < num_folds:
        raise ValueError(f"fewer patients ({num_patients}) than folds ({num_folds}): every fold needs a patient")


def assign_folds(
    case_patient: dict[str, str], lesion_ml: dict[str, float], num_folds: int, seed: int = 0
) -> dict[str, int]:
    """Map each case to a fold in ``range(num_folds)``; all cases of a patient share one fold.

    Patients are dealt one at a time, largest total lesion volume first, each to the fold holding the
    fewest cases so far, then the smallest lesion total: fold case counts stay within one patient of
    each other and lesion totals close. ``seed`` breaks ties (equal volumes, equal folds), so the same
    inputs and seed always give the same folds.

    Args:
        case_patient: case name -> patient identifier.
        lesion_ml: case name -> lesion volume in mL; same keys as ``case_patient``.
        num_folds: number of folds, at least 2 and at most the number of patients.
        seed: seed of the tie-breaking order.

    Returns:
        case name -> fold index, in the order of ``case_patient``.
    """
    if set(case_patient) != set(lesion_ml):
        differing = sorted(set(case_patient) ^ set(lesion_ml))
        raise ValueError(f"case_patient and lesion_ml must name the same cases; they differ on {differing}")
    cases_of: dict[str, list[str]] = {}
    for case, patient in case_patient.items():
        cases_of.setdefault(patient, []).append(case)
    validate_fold_count(len(cases_of), num_folds)

    rng = random.Random(seed)
    patients = sorted(cases_of)
    rng.shuffle(patients)
    patients.sort(key=lambda p: -sum(lesion_ml[c] for c in cases_of[p]))  # stable: the shuffle breaks ties
    fold_tiebreak = list(range(num_folds))
    rng.shuffle(fold_tiebreak)

    case_counts = [0] * num_folds
    lesion_totals = [0.0] * num_folds
    fold_of_patient = {}
    for patient in patients:
        fold = min(range(num_folds), key=lambda f: (case_counts[f], lesion_totals[f], fold_tiebreak[f]))
        fold_of_patient[patient] = fold
        case_counts[fold] += len(cases_of[patient])
        lesion_totals[fold] += sum(lesion_ml[c] for c in cases_of[patient])
    return {case: fold_of_patient[patient] for case, patient in case_patient.items()}
