"""Evaluation without Lightning. By generation: a model completes the prompts of prompt -> completion
pairs with each decoding method (greedy, beam, sampled), and its completions are scored against the
references (exact match, token accuracy, chrF, BLEU). By likelihood: multiple-choice tasks (HellaSwag,
any {context, choices, label} file) scored as lm-evaluation-harness scores them (acc, acc_norm). The
evaluate command and the training callback share it."""
