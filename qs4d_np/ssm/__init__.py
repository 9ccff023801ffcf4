"""The S4D state-space layer: discretization, kernel, FFT convolution, recurrent scan."""
