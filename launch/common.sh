# Helpers the launch scripts source: print (DRY_RUN=1) or run each command.

show() {  # the command, quoted so that it can be pasted into a shell
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() { if [[ "${DRY_RUN:-0}" != 0 ]]; then show "$@"; else "$@"; fi; }
