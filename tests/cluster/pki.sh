#!/usr/bin/env bash
# Makes the cluster's certificates and kubeconfigs in $LAB/pki (once).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ -f "$PKI/done" ] && exit 0
mkdir -p "$PKI" && cd "$PKI"

key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1.key" 2>/dev/null; }

openssl_cnf() { # SANs
	cat <<CNF
[req]
distinguished_name = dn
[dn]
[ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = $1
${2:+subjectAltName = $2}
CNF
}

# cert NAME SUBJECT EKU [SANS]
cert() {
	key "$1"
	openssl_cnf "$3" "${4:-}" >"$1.cnf"
	openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" -config "$1.cnf" 2>/dev/null
	openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
		-extfile "$1.cnf" -extensions ext -out "$1.crt" 2>/dev/null
	rm -f "$1.csr" "$1.cnf"
}

key ca
openssl req -x509 -new -key ca.key -subj "/CN=vimg-lab-ca" -days 3650 -out ca.crt \
	-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null

cert apiserver "/CN=kube-apiserver" serverAuth \
	"DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP,IP:$API_SERVICE_IP"
cert admin "/O=system:masters/CN=vimg-lab-admin" clientAuth
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
cert controller-manager "/CN=system:kube-controller-manager" clientAuth
cert scheduler "/CN=system:kube-scheduler" clientAuth
cert kube-proxy "/CN=system:kube-proxy" clientAuth
cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
cert kubelet-serving "/CN=$NODE_NAME" serverAuth "DNS:$NODE_NAME,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP"
key sa && openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
chmod 600 ./*.key

for who in admin controller-manager scheduler kube-proxy kubelet; do
	kc=$LAB/$who.kubeconfig
	"$BIN/kubectl" config set-cluster vimg-lab --server="$API_URL" --certificate-authority="$PKI/ca.crt" --embed-certs --kubeconfig="$kc" >/dev/null
	"$BIN/kubectl" config set-credentials "$who" --client-certificate="$PKI/$who.crt" --client-key="$PKI/$who.key" --embed-certs --kubeconfig="$kc" >/dev/null
	"$BIN/kubectl" config set-context vimg-lab --cluster=vimg-lab --user="$who" --kubeconfig="$kc" >/dev/null
	"$BIN/kubectl" config use-context vimg-lab --kubeconfig="$kc" >/dev/null
	chmod 600 "$kc"
done
touch done
