"""Versioned prompt templates (teacher, judge, student) and tolerant parsers for what models write.

The wording lives here; the judge's rubric and the teacher's block of general principles live as
data (`synthpert/templates/`, or a user's own files named in the config). `PromptSet.versions`
hashes each template with the data it renders, so any wording change gives a new id that
manifests, stage keys and MLflow record: traces made with one prompt are never mixed silently
with traces made with another.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from synthpert.config import CELL_LINES, GRADES, LABELS, GenerateConfig
from synthpert.errors import SynthPertError

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN = "builtin"

CELL_DESCRIPTIONS = {
    "k562": "K562 (human chronic myelogenous leukemia)",
    "rpe1": "RPE1 (hTERT-immortalized human retinal pigment epithelium)",
    "hepg2": "HepG2 (human hepatocellular carcinoma)",
    "jurkat": "Jurkat (human T-cell leukemia)",
}
assert set(CELL_DESCRIPTIONS) == set(CELL_LINES)

OPTIONS = ", ".join(LABELS[:-1]) + f" or {LABELS[-1]}"

SYSTEM = (
    "You are an expert molecular and cellular biologist. You reason carefully about gene "
    "function, pathways, protein complexes and gene regulation to predict the transcriptional "
    "consequences of genetic perturbations."
)

QUESTION = (
    "In {cell} cells, the gene {pert} is knocked down with CRISPR interference (CRISPRi). "
    "As a result, is the expression of the gene {gene} {options}?"
)

# The direction question (evaluate.direction = separate), asked of pairs known to be DE, as PerturbQA
# and SynthPert ask it.
QUESTION_DIRECTION = (
    "In {cell} cells, the gene {pert} is knocked down with CRISPR interference (CRISPRi). As a result, the "
    "expression of the gene {gene} changes significantly. Is {gene} upregulated or downregulated?"
)
DIRECTIONS = LABELS[:2]

# The judge writes a critique, then this marker and one grade (the paper's critic).
GRADE_MARK = "Grade:"
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"  # a trace's tags
CRITIQUE_MARK = "Critique:"

TEMPLATES: dict[str, dict[str, str]] = {
    "teacher": {
        "system": SYSTEM,
        "user": "{principles_block}{question}\n\n{context_block}"
        "The experimentally observed outcome is: {label}.\n\n"
        "Explain, step by step, the biological reasoning that leads to this outcome: what {pert} does, how "
        "losing it affects the cell, and why that would leave {gene} {label}. Reason as if you were working "
        "the answer out, without saying that you were told it. Write your reasoning inside <think></think>, "
        "then give the outcome inside <answer></answer>, exactly as: <answer>{label}</answer>",
    },
    # One student prompt for every student: the cot student and the raw-label baseline see the same
    # user turn, in training and at test; they differ only in what they learned to answer.
    "student": {
        "system": SYSTEM,
        "user": "{question}\n\n{context_block}"
        "Think step by step about the biology inside <think></think>, then give exactly one of: {options_list} "
        "inside <answer></answer>.",
    },
    "student_direction": {
        "system": SYSTEM,
        "user": "{question}\n\n{context_block}"
        "Think step by step about the biology inside <think></think>, then give exactly one of: {options_list} "
        "inside <answer></answer>.",
    },
    # SynthPert's critic: the question and the reasoning, never the label or the final answer.
    "judge": {
        "system": "You are a strict expert reviewer of biological reasoning. You judge the reasoning itself, "
        "not which conclusion it reaches, and not its formatting or length.",
        "user": "{question}\n\n{context_block}"
        "Here is a reasoning written in answer to this question:\n<reasoning>\n{reasoning}\n</reasoning>\n\n"
        "Do not judge the final answer. Judge the reasoning: is it biologically accurate, specific to these "
        "genes, and does each step follow? Rubric:\n{rubric}\n\n"
        f"First write a short critique (two or three sentences) after \"{CRITIQUE_MARK}\". Then, on the last "
        f"line, write \"{GRADE_MARK}\" followed by exactly one of: {{grades}}.",
    },
    # The ablation (`generate.judge_sees_label`): the observed outcome is shown; one word back.
    "judge_label": {
        "system": "You are a strict expert reviewer of biological reasoning. You grade the quality of the "
        "reasoning only, not its formatting or length.",
        "user": "{question}\n\n{context_block}"
        "The experimentally observed outcome is: {label}.\n\n"
        "Here is a reasoning that was written to explain this outcome:\n<reasoning>\n{reasoning}\n</reasoning>\n\n"
        "Grade the reasoning with this rubric:\n{rubric}\n\n"
        "Reply with exactly one word: {grades}.",
    },
}

# Bump when the knowledge context's text changes (synthpert.data.knowledge): it is part of every
# prompt, so traces written with the old text must not be reused. 3: a training tuple's neighbours
# come from the whole training part, as an evaluation tuple's do (not from the traces' sample).
CONTEXT_VERSION = "3"


def read_rubric(path: str | Path) -> dict[str, str]:
    """A rubric file: the five grades, best first, each with what it means."""
    try:
        rubric = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SynthPertError(f"rubric {path}: {exc}") from None
    if not isinstance(rubric, dict) or tuple(rubric) != GRADES or not all(isinstance(v, str) and v.strip() for v in rubric.values()):
        raise SynthPertError(f"rubric {path} must map exactly the grades {list(GRADES)}, in that order, to descriptions")
    return {grade: " ".join(text.split()) for grade, text in rubric.items()}


def read_principles(spec: str | None) -> str:
    """The teacher's block of general principles: builtin, none (None or ""), or a user's file."""
    if not spec:
        return ""
    path = TEMPLATE_DIR / "principles.md" if spec == BUILTIN else Path(spec)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SynthPertError(f"generate.teacher_principles: {exc}") from None


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one run: templates plus the rubric and principles the config names."""

    rubric: dict[str, str]
    principles: str = ""
    judge_sees_label: bool = False
    versions: dict[str, str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        data = {"teacher": self.principles, "judge": self.rubric, "judge_label": self.rubric}
        versions = {}
        for name in ("teacher", "student", "student_direction", "judge_label" if self.judge_sees_label else "judge"):
            payload = json.dumps({"template": TEMPLATES[name], "data": data.get(name), "context": CONTEXT_VERSION}, sort_keys=True)
            versions["judge" if name.startswith("judge") else name] = f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"
        object.__setattr__(self, "versions", versions)

    @classmethod
    def from_config(cls, g: GenerateConfig | None = None) -> PromptSet:
        g = g or GenerateConfig()
        rubric = g.rubric or TEMPLATE_DIR / ("rubric_label.yaml" if g.judge_sees_label else "rubric.yaml")
        return cls(read_rubric(rubric), read_principles(g.teacher_principles), g.judge_sees_label)

    def teacher(self, row: Mapping, context: str | None = None) -> list[dict[str, str]]:
        """Ask the teacher to explain the TRUE label of `row` as <think>…</think><answer>…</answer>."""
        block = f"General principles of the transcriptional response to a CRISPRi knock-down:\n{self.principles}\n\n" if self.principles else ""
        return _messages("teacher", **_fields(row, context), label=_label(row), principles_block=block)

    def judge(self, row: Mapping, reasoning: str, context: str | None = None) -> list[dict[str, str]]:
        """Ask the judge to grade `reasoning` (the <think> part only) for `row` on the rubric."""
        rubric = "\n".join(f"- {grade}: {text}" for grade, text in self.rubric.items())
        grades = ", ".join(GRADES[:-1]) + f" or {GRADES[-1]}"
        fields = {**_fields(row, context), "reasoning": reasoning.strip(), "rubric": rubric, "grades": grades}
        if self.judge_sees_label:
            return _messages("judge_label", **fields, label=_label(row))
        return _messages("judge", **fields)


def _fields(row: Mapping, context: str | None, question: str = QUESTION) -> dict[str, str]:
    try:
        cell, pert, gene = row["cell_line"], row["pert"], row["gene"]
    except KeyError as exc:
        raise SynthPertError(f"prompt row lacks field {exc.args[0]!r}: {dict(row)}") from None
    if cell not in CELL_DESCRIPTIONS:
        raise SynthPertError(f"unknown cell line {cell!r} in prompt row; known: {list(CELL_LINES)}")
    question = question.format(cell=CELL_DESCRIPTIONS[cell], pert=pert, gene=gene, options=OPTIONS)
    context_block = f"Background knowledge:\n{context.strip()}\n\n" if context and context.strip() else ""
    return {"question": question, "context_block": context_block, "pert": str(pert), "gene": str(gene)}


def _label(row: Mapping) -> str:
    label = row.get("label") if hasattr(row, "get") else None
    if label not in LABELS:
        raise SynthPertError(f"prompt row for ({row['cell_line']}, {row['pert']}, {row['gene']}) has label {label!r}; expected one of {list(LABELS)}")
    return str(label)


def _messages(name: str, **fields: str) -> list[dict[str, str]]:
    template = TEMPLATES[name]
    return [{"role": "system", "content": template["system"]}, {"role": "user", "content": template["user"].format(**fields)}]


def student_messages(row: Mapping, context: str | None = None) -> list[dict[str, str]]:
    """The student's question (system + user), the same for every student, in training and at
    test; it never contains the label."""
    options_list = ", ".join(f'"{label}"' for label in LABELS)
    return _messages("student", **_fields(row, context), options_list=options_list)


def direction_messages(row: Mapping, context: str | None = None) -> list[dict[str, str]]:
    """The separate direction question for a pair known to be differentially expressed."""
    options_list = ", ".join(f'"{label}"' for label in DIRECTIONS)
    return _messages("student_direction", **_fields(row, context, QUESTION_DIRECTION), options_list=options_list)


def format_answer(label: str) -> str:
    """The assistant target of raw-label training."""
    return f"{ANSWER_OPEN}{label}{ANSWER_CLOSE}"


# ---------------------------------------------------------------- parsing what models write
_NEG = r"(?:not|no|never|without)"
# Strong words name a direction anywhere; weak ones (also common in reasoning: "reduces
# ribosome biogenesis") count only inside <answer> tags or in a reply of a few words.
_UP_STRONG, _UP_WEAK = r"up[\s-]?regulat\w*|up|increas\w*|over[\s-]?express\w*", r"higher|elevat\w*|raised|rises?|rising"
_DOWN_STRONG = r"down[\s-]?regulat\w*|down|decreas\w*"
_DOWN_WEAK = r"lower\w*|reduc\w*|repress\w*|suppress\w*|diminish\w*|drops?|declin\w*"
_UP, _DOWN = f"{_UP_STRONG}|{_UP_WEAK}", f"{_DOWN_STRONG}|{_DOWN_WEAK}"
_TERSE = 6  # words: a reply this short is an answer, weak synonyms included
_NONE = [
    rf"{_NEG}\s+(?:be\s+|being\s+)?(?:significantly\s+|differentially\s+)?(?:differentially[\s-]expressed|de|deg)\b",
    r"non[\s-]?(?:differentially[\s-]expressed|de|deg)\b",
    rf"neither\b.{{0,40}}?\bnor\b\s*(?:{_UP}|{_DOWN})\b",
    rf"{_NEG}\s+(?:significantly\s+)?(?:{_UP})\s+(?:or|nor)\s+(?:{_DOWN})\b",
    rf"{_NEG}\s+(?:significantly\s+)?(?:{_DOWN})\s+(?:or|nor)\s+(?:{_UP})\b",
    rf"{_NEG}\s+(?:significant\s+|significantly\s+|notable\s+|meaningful\s+)?(?:chang|differen|effect|affect|alter|impact|differential\s+expression)\w*",
    r"unchanged|unaffected|unaltered|none|nde|no[\s-]?change|(?:remains?|stays?)\s+(?:the\s+same|similar|stable|constant)",
]
_CLASSES = {
    weak: (("upregulated", re.compile(rf"\b(?:{up})\b")), ("downregulated", re.compile(rf"\b(?:{down})\b")))
    for weak, up, down in ((True, _UP, _DOWN), (False, _UP_STRONG, _DOWN_STRONG))
}
_NONE_RE = re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in _NONE) + r")")
_NEGATED_RE = re.compile(rf"\b{_NEG}\s+(?:significantly\s+)?(?:{_UP}|{_DOWN})\b")
_TAG = re.compile(r"<\s*answer\s*>(.*?)(?:<\s*/\s*answer\s*>|$)", re.S | re.I)
_THINK = re.compile(r"<\s*think\s*>(.*?)(?:<\s*/\s*think\s*>|(?=<\s*answer\s*>)|$)", re.S | re.I)
_THINK_CLOSE = re.compile(r"<\s*/\s*think\s*>", re.I)
_SHORT = 30  # words: longer untagged text is reasoning, not an answer
_FINAL = re.compile(r"(?:final\s+answer|answer|prediction|conclusion|verdict)\s*(?:is|:|=|-)", re.I)


def _normalise(text: str) -> str:
    """Lower case, no markdown or punctuation, "n't" -> " not", arrows -> words, knockdown as one word."""
    text = text.lower().replace("’", "'").replace("n't", " not").replace("↑", " up ").replace("↓", " down ")
    text = re.sub(r"[^\w\s-]|_", " ", text)
    text = re.sub(r"\bknock(?:ed|ing|s)?[\s-]+down\b", "knockdown", text)
    return re.sub(r"\s+", " ", text).strip()


def _classify(text: str, weak: bool = True) -> str | None:
    """The one label a short answer text names; None if it names none or more than one."""
    text = _normalise(text)
    weak = weak or len(text.split()) <= _TERSE
    found = {LABELS[2]} if _NONE_RE.search(text) else set()
    rest = _NEGATED_RE.sub(" ", _NONE_RE.sub(" ", text))
    found |= {label for label, pattern in _CLASSES[weak] if pattern.search(rest)}
    return found.pop() if len(found) == 1 else None


def parse_answer(text: str | None) -> str | None:
    """The label a model's output commits to, or None when it commits to none or to several.

    Looks in the last <answer> tag when there is one. Without tags (and with <think> sections
    removed), it tries, in order, the text after a final 'answer:' marker, the last line, the first
    line and the whole text, each only when short (<= 30 words), and there only the unambiguous
    words count: an untagged ramble that says "suppression of differentiation" is reasoning, not
    an answer. Tolerates case, markdown, punctuation and synonyms (increased/up/upregulation,
    decreased/down, no change/not DE; reduced/elevated/... inside tags or terse replies).
    """
    if not text:
        return None
    tags = _TAG.findall(text)
    if tags:
        return _classify(tags[-1])
    body = _THINK.sub(" ", text)
    if _THINK_CLOSE.search(body):  # an unopened </think>: everything before it was reasoning
        body = _THINK_CLOSE.split(body)[-1]
    finals = list(_FINAL.finditer(body))
    lines = [line for line in body.splitlines() if _normalise(line)]
    candidates = [body[finals[-1].end() :].strip().split("\n\n")[0]] if finals else []
    candidates += [lines[-1], lines[0], body] if lines else []
    for candidate in candidates:
        if len(_normalise(candidate).split()) <= _SHORT:
            label = _classify(candidate, weak=False)
            if label:
                return label
    return None


def parse_trace(text: str | None) -> tuple[str | None, str | None]:
    """(reasoning, label) of `<think>…</think><answer>…</answer>`; tolerant of a missing tag.

    Reasoning is the <think> content (to the next <answer> or the end if unclosed); with no
    opening tag, the text before </think>; with no think tags at all, the text before <answer>.
    """
    if not text:
        return None, None
    think = _THINK.search(text)
    if think:
        reasoning = think.group(1)
    elif _THINK_CLOSE.search(text):
        reasoning = _THINK_CLOSE.split(text)[0]
    else:
        answer = re.search(r"<\s*answer\s*>", text, re.I)
        reasoning = text[: answer.start()] if answer else ""
    reasoning = reasoning.strip()
    return reasoning or None, parse_answer(text)


_GRADE_RE = re.compile(r"\b(" + "|".join(GRADES) + r")\b")
_GRADE_MARK = re.compile(r"\b(?:grade|rating|rated|score|verdict|quality|evaluation)\b\s*(?:is|as|of|:|=|-)?\s*(" + "|".join(GRADES) + r")\b")


def parse_grade(text: str | None) -> str | None:
    """The judge's grade: after the last 'grade:'/'rating:' (a critique comes first), else the first
    word if it is a grade, else the one grade mentioned; None when absent or ambiguous."""
    if not text:
        return None
    norm = _normalise(text)
    marked = list(_GRADE_MARK.finditer(norm))
    if marked:
        return marked[-1].group(1)
    words = norm.split()
    if words and words[0] in GRADES:
        return words[0]
    found = set(_GRADE_RE.findall(norm))
    return found.pop() if len(found) == 1 else None
