"""`make final`: the chosen trial retrained with several seeds, judged on the held-out test split, attacked."""
