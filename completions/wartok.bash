_wartok_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _WARTOK_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _wartok_completion wartok
