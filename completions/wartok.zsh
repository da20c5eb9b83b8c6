#compdef wartok

_wartok_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _WARTOK_COMPLETE=complete_zsh wartok)
}

compdef _wartok_completion wartok
