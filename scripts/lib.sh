# Shared by the bench scripts (sourced, not run).

# A free loopback TCP port (nothing answers a connect) outside the ephemeral
# range and never 6379 or 8080 (20000-31999).
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "no free port found" >&2
    return 1
}

# Waits until http://127.0.0.1:PORT/readyz answers 200 (10 s at most).
wait_ready() {
    for _ in $(seq 1 200); do
        curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    return 1
}
