"""SynthPert: teach LLMs to predict transcriptional responses to CRISPRi perturbations."""

__version__ = "0.1.0"
