"""mmf_cli"""
