"""Evaluation by generation: a model completes the prompts of prompt -> completion pairs with each
decoding method (greedy, beam, sampled), and its completions are scored against the references
(exact match, token accuracy, chrF, BLEU). The evaluate command and the training callback share it."""
