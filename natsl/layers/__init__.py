"""natsl layers: routing contract, linear and softmax branches, the NAtS-L layer."""
