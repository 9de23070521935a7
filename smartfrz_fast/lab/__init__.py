"""The predictor lab: everything offline that makes and judges the SmartFRZ predictor's weights.

Kept apart from the runtime predictor (``smartfrz_fast.predictor``: model, weight files,
loading) and from the engine's import path: ``import smartfrz_fast`` never imports this package.
Modules, each importing only those above it::

    zoo       networks, tasks (local data only), run specs, the evaluation networks
    cka       linear CKA through centred Gram matrices
    collect   train zoo runs through the engine and record what SmartFRZ sees (+ CKA Grams)
    labels    recorded runs -> training labels (CKA, or freezing trials), LabelSchedule
    trials    labels from freezing trials: branch, freeze, train to the end, compare
    scoring   the predictor's windows scored as in use; offline metrics
    train     train the predictor (either label source), leave-one-family-out
    evaluate  networks outside the zoo trained with every policy; comparison tables
    rebuild   one resumable command: record, trial, train, evaluate, write the table
"""
