"""Privacy evaluation (stage 4, in progress): does the model or the training carry personal data?

- `reference`: many federated models trained at once (reference models for membership inference).
"""
