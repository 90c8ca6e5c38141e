"""Prediction targets for masked modelling: computed without gradients, in fp32, from the input batch."""
