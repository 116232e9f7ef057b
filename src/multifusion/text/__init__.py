"""Text: the LM's base, masked-language pretraining on the descriptions, the sentence encoder, the text features."""
