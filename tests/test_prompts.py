import pytest

import synthpert.prompts as prompts
from synthpert.config import GRADES, LABELS
from synthpert.errors import SynthPertError
from synthpert.config import GenerateConfig
from synthpert.prompts import PromptSet, format_answer, parse_answer, parse_grade, parse_trace, student_messages

pytestmark = pytest.mark.unit

PROMPTS = PromptSet.from_config()
teacher_messages, judge_messages = PROMPTS.teacher, PROMPTS.judge

UP, DOWN, NONE = LABELS
ROW = {"cell_line": "rpe1", "pert": "RPL7", "gene": "MYC", "label": DOWN}

# Emitted by the bundled SmolLM2-135M-Instruct on our student prompts (sampled, T=0.7): it mostly
# restates the options or rambles. None of these commits to one answer except the ALB one.
SMOLLM2_ANSWERS = [
    ("The expression of the gene MYC upregulated, downregulated, or not differentially expressed, respectively.", None),
    ("The expression of the gene HspA1A is not upregulated, downregulated, or not differentially expressed.", None),
    (
        "The expression of the gene ALB is not differentially expressed in hepatocytes, which suggests that the "
        "knockdown of the ALB gene is not a",
        NONE,
    ),
    (
        "In K562 (chronic myelogenous leukemia), the gene RPL7 is knocked down with CRISPRi, and the result is a knockdown "
        "of the RPL7 gene, which allows the expression of the MYC gene to be expressed. The expression of MYC is "
        "upregulated, downregulated, or not differentially expressed, as one specific protein is not regulated, but the "
        "activity of MYC is regulated by a single protein, which is the protein encoded by the RPL7 gene.\n\nThis is a "
        "common pattern where the expression of a gene is regulated by a single protein, which is a gene that is regulated "
        "by a single protein, and this gene is a common example of a regulator gene that is regulated by a single",
        None,
    ),
    (
        "To determine whether the expression of the gene HSPA1A upregulated, downregulated, or not differentially expressed "
        "is to perform a comparative genomic analysis (CAG) analysis. This method involves comparing the expression levels "
        "of genes within a cell line, specifically the cells engineered to carry the gene for HPSSA1A.\n\nBy comparing the "
        "expression levels of HPSSA1A along the cag-12 pathway, a gene that is overexpressed in HPSSA1A cells, you will be "
        "able to identify whether the gene encodes for the gene of interest or not.\n\nThe results of this analysis can "
        "provide information about the expression levels of the gene in a cell line, which is often a valuable resource "
        "for understanding the",
        None,
    ),
    (
        "To answer the question, let's step through the steps of biology in the context of gene function, gene regulation, "
        "and cellular biology. First, we need to understand that epigenetic regulation plays a crucial role in gene "
        "regulation.\n\nThe gene SUPT5H is a gene that encodes a protein that plays a role in the suppression of cellular "
        "differentiation. SU",
        None,  # "suppression" is part of the ramble, not an answer
    ),
]
SMOLLM2_GRADES = [
    ("It's an excellent response.", "excellent"),
    ("I'm sorry for any confusion, but the answer to this question is a bit complex - it really depends on the context of the topic. However,", None),
    ("This is an excellent example of a biocomputing review, so I'll keep the previous rubric:\n\ndef good\n\nThis is an", None),
]

# What small chat models write besides (tags, markdown, synonyms, unclosed tags, hedges).
ANSWERS = SMOLLM2_ANSWERS + [
    ("<think>RPL7 is a ribosomal protein ...</think><answer>upregulated</answer>", UP),
    ("<think>blah</think>\n<answer> Downregulated. </answer>", DOWN),
    ("<answer>**Not differentially expressed**</answer>", NONE),
    ("<answer>NOT DIFFERENTIALLY EXPRESSED</answer>", NONE),
    ("<answer>not differentially expressed", NONE),  # unclosed tag
    ("<answer>decrease</answer>", DOWN),
    ("<answer>Reduced expression</answer>", DOWN),
    ("<answer>elevated</answer>", UP),
    ("Lower expression.", DOWN),  # terse reply: weak synonyms count
    ("Knockdown of RPL7 reduces ribosome biogenesis, so MYC is upregulated.", UP),
    ("Loss of RPL7 reduces translation and lowers growth signalling in the cell overall.", None),
    ("<answer>↑</answer>", UP),
    ("<answer>upregulated</answer> wait, <answer>downregulated</answer>", DOWN),  # the last tag counts
    ("<answer>upregulated or downregulated</answer>", None),
    ("<answer>Increased expression of MYC</answer>", UP),
    ("reasoning only... </think> <answer>downregulated</answer>", DOWN),
    ("<think>Knocking down RPL7 reduces ... so MYC</think><answer>increased</answer>", UP),
    ("Answer: Upregulated", UP),
    ("The answer is: **DOWNREGULATED**", DOWN),
    ("Final Answer: upregulated\n\nNote: it might also be downregulated in other cells", UP),
    ("## Answer\n\n- **Upregulated** (increased expression)", UP),
    ("upregulated", UP),
    ("Up", UP),
    ("down.", DOWN),
    ("up-regulated", UP),
    ("Down regulation", DOWN),
    ("no change", NONE),
    ("Unchanged.", NONE),
    ("not DE", NONE),
    ("Non-DE", NONE),
    ("The expression of MYC is not significantly changed.", NONE),
    ("There is no significant change in MYC expression.", NONE),
    ("Neither upregulated nor downregulated", NONE),
    ("MYC is not upregulated or downregulated.", NONE),
    ("The gene isn't differentially expressed", NONE),
    ("MYC doesn't change", NONE),
    ("MYC remains the same", NONE),
    ("MYC stays stable.", NONE),
    ("MYC is upregulated by the same mechanism.", UP),
    ("Knocking down RPL7 leads to upregulation of MYC.", UP),
    ("Based on the reasoning above, MYC expression is likely to decrease.\n", DOWN),
    ("Downregulated\nExplanation: because RPL7 knockdown lowers ribosome biogenesis ...", DOWN),
    ("It could be upregulated or downregulated.", None),
    ("I think the gene is not upregulated.", None),  # says what it is not, not what it is
    ("The gene MYC would be differentially expressed.", None),  # DE, direction unknown
    ("<think>The gene goes up</think>", None),  # reasoning only, no committed answer
    ("The answer is A", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("text, label", ANSWERS)
def test_parse_answer_on_messy_outputs(text, label):
    assert parse_answer(text) == label


@pytest.mark.parametrize(
    "text, reasoning, label",
    [
        ("<think>\nRPL7 builds the 60S subunit.\n</think>\n<answer>downregulated</answer>", "RPL7 builds the 60S subunit.", DOWN),
        ("<think>RPL7 builds the 60S subunit.<answer>downregulated</answer>", "RPL7 builds the 60S subunit.", DOWN),
        ("RPL7 builds the 60S subunit.</think><answer>Down</answer>", "RPL7 builds the 60S subunit.", DOWN),
        ("Sure! <think>stress response</think> <answer>up</answer> Hope this helps.", "stress response", UP),
        ("RPL7 builds the 60S subunit. <answer>no change</answer>", "RPL7 builds the 60S subunit.", NONE),
        ("<think>long reasoning that never finishes", "long reasoning that never finishes", None),
        ("<think></think><answer>upregulated</answer>", None, UP),
        ("<answer>upregulated</answer>", None, UP),
        ("upregulated", None, UP),
    ],
)
def test_parse_trace(text, reasoning, label):
    assert parse_trace(text) == (reasoning, label)


@pytest.mark.parametrize(
    "text, grade",
    SMOLLM2_GRADES
    + [
        ("excellent", "excellent"),
        ("Excellent.", "excellent"),
        ("**Good**", "good"),
        ("Grade: average", "average"),
        ("Critique: a good start; the grade I would give is not excellent.\nGrade: bad", "bad"),  # the last mark
        ("The grade is: bad.", "bad"),
        ("TERRIBLE - the reasoning is circular", "terrible"),
        ("I would rate this reasoning as average.", "average"),
        ("Rating: good (not excellent: it misses the mechanism)", "good"),
        ("The reasoning is good, but not excellent.", None),
        ("Rating: 5", None),
        ("", None),
    ],
)
def test_parse_grade(text, grade):
    assert parse_grade(text) == grade


def test_teacher_sees_the_true_label_students_never_do():
    context = "RPL7: ribosomal protein L7\nShared GO terms: none"
    teacher = teacher_messages(ROW, context)
    assert [m["role"] for m in teacher] == ["system", "user"]
    assert "observed outcome is: downregulated" in teacher[1]["content"]
    assert "<answer>downregulated</answer>" in teacher[1]["content"] and context in teacher[1]["content"]
    assert "General principles" in teacher[1]["content"] and "dCas9-KRAB" in teacher[1]["content"]
    bare = PromptSet.from_config(GenerateConfig(teacher_principles=None)).teacher(ROW, context)
    assert "General principles" not in bare[1]["content"]
    text = student_messages(ROW, context)[1]["content"]
    assert "RPL7" in text and "MYC" in text and "RPE1" in text and context in text
    assert "observed" not in text and "<answer></answer>" in text and "<think>" in text
    assert "General principles" not in text  # the teacher's help, not the student's
    assert "Background knowledge" not in student_messages(ROW, None)[1]["content"]
    assert "Background knowledge" not in student_messages(ROW, "  ")[1]["content"]
    unlabelled = {k: v for k, v in ROW.items() if k != "label"}
    assert student_messages(unlabelled) == student_messages(ROW)  # the label cannot leak in
    assert parse_answer(format_answer(UP)) == UP


def test_the_default_judge_is_blind_to_the_label_and_the_answer():
    """SynthPert's critic: question + reasoning only, a critique first, then a grade."""
    user = judge_messages(ROW, "  Loss of RPL7 triggers nucleolar stress.  ")[1]["content"]
    assert "<reasoning>\nLoss of RPL7 triggers nucleolar stress.\n</reasoning>" in user
    assert DOWN not in user.replace(prompts.OPTIONS, "")  # the label is nowhere but in the question's options
    assert "observed" not in user and "Do not judge the final answer" in user and "Critique:" in user and "Grade:" in user
    for grade, text in PROMPTS.rubric.items():
        assert f"- {grade}: {text}" in user
    assert user.index("- excellent") < user.index("- terrible") and tuple(PROMPTS.rubric) == GRADES
    ablation = PromptSet.from_config(GenerateConfig(judge_sees_label=True))
    shown = ablation.judge(ROW, "Loss of RPL7 triggers nucleolar stress.")[1]["content"]
    assert "observed outcome is: downregulated" in shown and "leads to the observed outcome" in shown
    assert ablation.versions["judge"] != PROMPTS.versions["judge"]


def test_rubrics_are_data(tmp_path):
    mine = tmp_path / "rubric.yaml"
    mine.write_text("\n".join(f"{g}: my words for {g}" for g in GRADES))
    custom = PromptSet.from_config(GenerateConfig(rubric=mine))
    assert "- bad: my words for bad" in custom.judge(ROW, "r")[1]["content"]
    assert custom.versions["judge"] != PROMPTS.versions["judge"] and custom.versions["teacher"] == PROMPTS.versions["teacher"]
    mine.write_text("excellent: x\ngood: y\n")
    with pytest.raises(SynthPertError, match="must map exactly the grades"):
        PromptSet.from_config(GenerateConfig(rubric=mine))
    with pytest.raises(SynthPertError, match="teacher_principles"):
        PromptSet.from_config(GenerateConfig(teacher_principles=str(tmp_path / "missing.md")))


def test_bad_rows_are_clear_errors():
    with pytest.raises(SynthPertError, match="has label 'up'"):
        teacher_messages({**ROW, "label": "up"})
    with pytest.raises(SynthPertError, match="unknown cell line 'hela'"):
        student_messages({**ROW, "cell_line": "hela"})
    with pytest.raises(SynthPertError, match="lacks field 'gene'"):
        student_messages({"cell_line": "k562", "pert": "A"})


def test_template_versions_follow_the_text(monkeypatch):
    before = dict(PROMPTS.versions)
    assert set(before) == {"teacher", "judge", "student", "student_direction"} and len(set(before.values())) == 4
    monkeypatch.setitem(prompts.TEMPLATES["student"], "user", "{question} answer!")
    changed = PromptSet.from_config().versions
    assert changed["student"] != before["student"] and changed["teacher"] == before["teacher"]
    monkeypatch.setattr(prompts, "CONTEXT_VERSION", "next")  # the context text is in every prompt
    assert all(PromptSet.from_config().versions[k] != changed[k] for k in before)
    monkeypatch.undo()
    assert PromptSet.from_config().versions == before
    no_principles = PromptSet.from_config(GenerateConfig(teacher_principles=None)).versions
    assert no_principles["teacher"] != before["teacher"] and no_principles["judge"] == before["judge"]
