"""Tests on 2 gloo ranks of transformers' distributed engine (TP / EP / FSDP2) and of accelerate on this model."""
