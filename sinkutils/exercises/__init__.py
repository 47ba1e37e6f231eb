"""The assignments' exercises (``assignments/``): prepared inputs, the book's reference, and a diagnosis.

Each exercise names the function a student writes (``attention_to_first``, ``sink_rate``, ...), the chapter
it practises, prepared inputs (small tensors from a fixed seed: milliseconds on a CPU) and a diagnosis. The
diagnosis compares the student's outputs with the reference in ``sinkutils`` (``metrics``, ``measure``,
``interventions``, ``structure``, ``variants``, ``attention``: never a second copy of a formula) and, when they
differ, says which mistake the outputs show (wrong shape or axis, causal mask missing, sample instead of
population variance, ...), not just "wrong".

    exercises.check_sink_rate(sink_rate)     # in a notebook: prints the verdict; a wrong result raises
                                             # ExerciseFailed with the hint; a stub says "not implemented yet"
    exercises.run("sink_rate", sink_rate)    # Result(exercise, passed, message); never raises

The package, as ARENA keeps a tests file per part: ``harness`` registers exercises, runs a function on the
prepared inputs (``collect``, in the student's kernel), judges the outputs (``judge``, in the grader's process,
``sinkutils.assign``) and reports the verdict (``check``); ``ch1_sink`` ... ``ch6_headwise`` hold the exercises
of one assignment each, with their ``check_NAME`` functions. This module gathers them under one name.
"""
from sinkutils.exercises.harness import (EXERCISES, NOT_IMPLEMENTED, Exercise, ExerciseFailed, Result, Verdict,
                                         chapters, check, collect, exercise, judge, of_chapter, plain, run)
from sinkutils.exercises.ch1_sink import check_attention_to_first, check_sink_rate
from sinkutils.exercises.ch2_variance import check_dimension_variance, check_predicted_variance
from sinkutils.exercises.ch3_interventions import check_amplified, check_mask_intervention, check_norm_scaled
from sinkutils.exercises.ch4_super_neurons import check_kendall_tau, check_super_neurons
from sinkutils.exercises.ch5_disparity import check_dominance_ratio, check_mean_pairwise_cosine
from sinkutils.exercises.ch6_headwise import check_effective_rank, check_headwise_rmsnorm, check_sigmoid_attention

__all__ = [
    "EXERCISES", "NOT_IMPLEMENTED", "Exercise", "ExerciseFailed", "Result", "Verdict",
    "chapters", "check", "collect", "exercise", "judge", "of_chapter", "plain", "run",
    "check_attention_to_first", "check_sink_rate",
    "check_dimension_variance", "check_predicted_variance",
    "check_mask_intervention", "check_amplified", "check_norm_scaled",
    "check_kendall_tau", "check_super_neurons",
    "check_dominance_ratio", "check_mean_pairwise_cosine",
    "check_headwise_rmsnorm", "check_sigmoid_attention", "check_effective_rank",
]
