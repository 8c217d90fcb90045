"""Image and text scorers (CLIP, ImageReward, HPS v2.1, LAION aesthetic, BLIP-2 VQA, FID, BERTScore).

Each scorer has one loader that takes a local folder or a hub id, so the tiny models the project saves to
disk go through exactly the code that loads the official weights in the paper profile.
"""
