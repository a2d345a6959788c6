"""The embedded default: a tiny SD pretrained on the digits, and the Table 3 reproduction."""
