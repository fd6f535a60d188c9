#!/usr/bin/env bash
# The injector's serving certificate without cert-manager: a CA of its own and a certificate
# for the webhook Service's name, made with openssl.
#
#   bash injector-certs.sh [--apply] [DIR]     (DIR: where the files go, default ./injector-certs)
#
# Without --apply it writes ca.crt, ca.key, tls.crt, tls.key into DIR and prints the kubectl
# commands; with --apply it also runs them: the trellis-injector-tls Secret is created or
# replaced, and the MutatingWebhookConfiguration's caBundle set to ca.crt (apply injector.yaml
# first; injector-cert-manager.yaml is not needed in this setup). Run it again
# before tls.crt expires (365 days); the injector re-reads the renewed files, and the CA (10
# years) is kept when DIR already has one.
set -euo pipefail

apply=false
if [ "${1:-}" = --apply ]; then apply=true; shift; fi
dir=${1:-injector-certs}
namespace=${NAMESPACE:-trellis-system}
host=trellis-injector.$namespace.svc
mkdir -p "$dir"
cd "$dir"

if [ ! -s ca.crt ] || [ ! -s ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=trellis-injector-ca" -keyout ca.key -out ca.crt 2>/dev/null
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$host" \
  -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n' "$host" > tls.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
  -extfile tls.ext -out tls.crt 2>/dev/null
rm -f tls.csr tls.ext ca.srl
chmod 600 ca.key tls.key
openssl verify -CAfile ca.crt tls.crt >/dev/null

commands=(
  "kubectl -n $namespace create secret tls trellis-injector-tls --cert=tls.crt --key=tls.key --dry-run=client -o yaml | kubectl apply -f -"
  "kubectl patch mutatingwebhookconfiguration trellis-injector --type=json -p '[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$(base64 -w0 < ca.crt)\"},{\"op\":\"add\",\"path\":\"/webhooks/1/clientConfig/caBundle\",\"value\":\"$(base64 -w0 < ca.crt)\"}]'"
)
echo "certificate for $host in $PWD (tls.crt, tls.key; CA: ca.crt, ca.key)"
for c in "${commands[@]}"; do
  if $apply; then bash -c "$c"; else echo "$c"; fi
done
