"""anp_vs_tf"""
