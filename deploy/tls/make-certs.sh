#!/bin/sh
# Certificates for Kafka over mutual TLS, as docker-compose.tls.yml and the TLS tests use them:
#   ca.pem                 the CA (KAFKA_SSL_CAFILE of the clients; the broker's trust store)
#   server.pem, server.key the broker's certificate for NAME... (default: kafka localhost 127.0.0.1) and its key
#   server-keystore.pem    the same key and certificate in one file: Apache Kafka's PEM key store
#   client.pem, client.key the client certificate (KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE)
# Usage: deploy/tls/make-certs.sh DIR [NAME...]    (needs the openssl command)
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DIR [NAME...]" >&2; exit 2; }
dir=$1
shift
[ $# -gt 0 ] || set -- kafka localhost 127.0.0.1
san=""
for name in "$@"; do
  case $name in
    *[!0-9.]*) san="$san,DNS:$name" ;;
    *) san="$san,IP:$name" ;;
  esac
done
mkdir -p "$dir"
cd "$dir"
days=825
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -keyout ca.key -out ca.pem -days $days -subj "/CN=segmentation Kafka CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
leaf() {  # leaf NAME COMMON_NAME EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=$3" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid,issuer" ${4:+"subjectAltName=$4"} \
    > "$1.ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days $days -out "$1.pem" \
    -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
leaf server "$1" serverAuth "${san#,}"
leaf client segmentation clientAuth
cat server.key server.pem > server-keystore.pem
rm -f ca.srl
