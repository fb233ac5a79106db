"""The default model's research, plugged into the library's training through its public pieces.

`vision_stage` trains stage vision (the recipe's `trainer:`); `box_attention`, `token_relevance` and
`token_scale` are extensions (`dsvl2.train.extension`) that the recipe's YAML files list. What each
measured is in ../NOTES.md.
"""
