#!/bin/sh
# Writes the TLS test fixtures of tests/shared/test_bus_auth.py: two throwaway CAs, a server certificate for
# 127.0.0.1/localhost and a client certificate, both signed by ca.pem, valid for 100 years. Test-only keys.
# Rerun (from this folder) only to replace them: `sh make.sh`.
set -eu
days=36500
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
for ca in ca other-ca; do
  openssl req -x509 $ec -keyout "$ca-key.pem" -out "$ca.pem" -days $days -subj "/CN=onepool test $ca" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
done
sign() {  # name, subject, extensions
  openssl req -new $ec -keyout "$1-key.pem" -out "$1.csr" -subj "$2"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out "$1.pem" -days $days \
    -extfile "$1.ext"
  rm "$1.csr" "$1.ext"
}
sign server "/CN=127.0.0.1" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth"
sign client "/CN=onepool test client" "extendedKeyUsage=clientAuth"
rm -f ca-key.pem other-ca-key.pem ca.srl
