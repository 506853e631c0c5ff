"""Reports: one renderer (Markdown + self-contained HTML with PNG plots), the typed figures every report is drawn
from, and the paired statistics it shows.

A bottom layer: pure rendering and statistics over plain data; it imports nothing of the project but its errors.
"""

from runtime.report.document import PAIRED_NOTE, Report, fmt, fmt_p, paired_table
from runtime.report.evaluation import render_evaluation
from runtime.report.experiment import accuracy_figure, paired_conditions, render_comparison, render_experiment
from runtime.report.figures import (
    Accuracy,
    Answers,
    Benchmark,
    Change,
    ComparisonFigures,
    Condition,
    ExperimentFigures,
    Figures,
    GatherFigures,
    Gathering,
    GuidanceExample,
    InstructCondition,
    InstructFigures,
    Stages,
    Story,
    Summary,
)
from runtime.report.instruct import predecessor, render_instruct
from runtime.report.stats import (
    PRIOR_SHIFT_THRESHOLD,
    PairedDiff,
    answer_distribution,
    flag_prior_shift,
    mcnemar_exact,
    pair_by_id,
    paired_difference,
    pass_at_k,
    pass_at_ks,
    prior_shift,
    verdict,
)

__all__ = [
    "PAIRED_NOTE",
    "PRIOR_SHIFT_THRESHOLD",
    "Accuracy",
    "Answers",
    "Benchmark",
    "Change",
    "ComparisonFigures",
    "Condition",
    "ExperimentFigures",
    "Figures",
    "GatherFigures",
    "Gathering",
    "GuidanceExample",
    "InstructCondition",
    "InstructFigures",
    "PairedDiff",
    "Report",
    "Stages",
    "Story",
    "Summary",
    "accuracy_figure",
    "answer_distribution",
    "flag_prior_shift",
    "fmt",
    "fmt_p",
    "mcnemar_exact",
    "pair_by_id",
    "paired_difference",
    "paired_conditions",
    "paired_table",
    "pass_at_k",
    "pass_at_ks",
    "predecessor",
    "prior_shift",
    "render_comparison",
    "render_evaluation",
    "render_experiment",
    "render_instruct",
    "verdict",
]
